"""The comparison document's PNG plots (matplotlib only): latency per scan, stage times, Dice per class.

Seconds on the time axes; Dice 0..1. Each function draws one figure and writes it atomically, or returns None
when the document holds nothing to draw.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.core.atomic import atomic_path
from common.records.metrics import label_name
from common.records.results import STAGES
from common.reporting.comparison_doc import ComparisonDoc
from common.reporting.report_markdown import fmt_s


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_png(fig, target: Path) -> Path:
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return target


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def shown_name(doc: ComparisonDoc, method: str) -> str:
    """The method's name as the plots show it: approximate runs say so, as the Markdown tables do."""
    m = doc.methods.get(method)
    return method + (f" ({m.arithmetic.upper()})" if m is not None and m.arithmetic != "exact" else "")


def plot_latency(doc: ComparisonDoc, target: Path) -> Path | None:
    """Grouped bars: median latency (s) per scan and method, error bars from min to max repeat."""
    labels = list(doc.methods)
    scans = [s for s in doc.scans if any(r.scan_id == s and r.median_total_s for r in doc.rows)]
    if not scans:
        return None
    by = {(r.scan_id, r.method): r for r in doc.rows}
    fig = _new_figure(max(6.0, 1.2 + len(scans) * (0.5 + 0.35 * len(labels))), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(labels)
    x = np.arange(len(scans))
    vals_all = []
    for i, (label, color) in enumerate(zip(labels, _colors(len(labels)), strict=True)):
        h, lo, hi = [], [], []
        for s in scans:
            r = by.get((s, label))
            med = r.median_total_s if r and r.median_total_s is not None else np.nan
            h.append(med)
            lo.append(med - r.min_total_s if r and r.min_total_s is not None else 0.0)
            hi.append(r.max_total_s - med if r and r.max_total_s is not None else 0.0)
        vals_all += [v for v in h if np.isfinite(v)]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, h, width, yerr=[lo, hi], capsize=3,
               label=shown_name(doc, label),
               color=color, edgecolor="black", linewidth=0.4)
    if vals_all and min(vals_all) > 0 and max(vals_all) / min(vals_all) > 50:
        ax.set_yscale("log")
    ax.set_xticks(x, scans, rotation=30 if len(scans) > 4 else 0, ha="right" if len(scans) > 4 else "center")
    ax.set_ylabel("median latency per scan (s)")
    ax.set_title("Latency per scan (bars: median, whiskers: min–max over repeats)")
    fig.legend(fontsize="small", loc="outside lower center")  # below the axes: inside, it covers tall bars
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, target)


def plot_stages(doc: ComparisonDoc, target: Path) -> Path | None:
    """Stacked bars per method: mean over scans of the median seconds per stage, plus unattributed time."""
    labels = [m for m in doc.methods if doc.methods[m].stages_mean_s or doc.methods[m].total_mean_s]
    if not labels:
        return None
    fig = _new_figure(max(5.5, 1.5 + 1.3 * len(labels)), 5.5)  # room for the slanted names
    ax = fig.add_subplot()
    parts = [*STAGES, "other"]
    colors = dict(zip(parts, _colors(len(parts)), strict=True))
    bottom = np.zeros(len(labels))
    used = set()
    for part in parts:
        vals = []
        for m in labels:
            s = doc.methods[m]
            if part == "other":
                total = s.total_mean_s or 0.0
                vals.append(max(0.0, total - sum(s.stages_mean_s.values())))
            else:
                vals.append(s.stages_mean_s.get(part, 0.0))
        vals = np.asarray(vals)
        if not vals.any():
            continue
        used.add(part)
        ax.bar([shown_name(doc, m) for m in labels], vals, bottom=bottom,
               label=part if part != "other" else "other (unattributed)",
               color=colors[part], edgecolor="black", linewidth=0.4)
        bottom += vals
    for i, m in enumerate(labels):
        total = doc.methods[m].total_mean_s
        if total:
            ax.text(i, bottom[i], f"{fmt_s(total)} s", ha="center", va="bottom", fontsize="small")
    ax.tick_params(axis="x", labelrotation=20)  # method names are long: side by side they overlap
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
    ax.set_ylabel("seconds (mean over scans of per-scan medians)")
    ax.set_title("Where the time goes")
    ax.margins(y=0.1)
    if used:
        ax.legend(fontsize="small", loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, target)


def plot_dice(doc: ComparisonDoc, target: Path, key: str = "dice", title: str = "vs reference") -> Path | None:
    """Per class Dice distribution (box over scans + points), one panel per method; ``key`` is "dice" (vs
    the reference) or "gt_dice" (vs ground truth)."""
    per_method: dict[str, dict[int, list[float]]] = {}
    for r in doc.rows:
        dice = getattr(r, key)
        if dice:
            d = per_method.setdefault(r.method, {})
            for lab, v in dice.items():
                d.setdefault(lab, []).append(v)
    if not per_method:
        return None
    classes = sorted({lab for d in per_method.values() for lab in d})
    names = doc.structure_names
    width = min(32.0, max(7.0, 2.0 + 0.17 * len(classes)))
    fig = _new_figure(width, 2.6 * len(per_method) + 1.2)
    axes = fig.subplots(len(per_method), 1, squeeze=False, sharex=True)[:, 0]
    rng = np.random.default_rng(0)
    colors = dict(zip(doc.methods, _colors(len(doc.methods)), strict=True))
    for ax, (method, d) in zip(axes, per_method.items(), strict=True):
        pos = [i for i, lab in enumerate(classes) if lab in d]
        data = [d[classes[i]] for i in pos]
        ax.boxplot(data, positions=pos, widths=0.6, showfliers=False,
                   medianprops={"color": "black"}, boxprops={"color": colors.get(method, "C0")})
        for p, vals in zip(pos, data, strict=True):
            ax.scatter(p + rng.uniform(-0.15, 0.15, len(vals)), vals, s=8, color=colors.get(method, "C0"),
                       alpha=0.8, zorder=3)
        ax.set_ylim(-0.03, 1.03)
        ax.axhline(0.95, color="grey", lw=0.6, ls="--")
        ax.set_ylabel("Dice")
        ax.set_title(f"{shown_name(doc, method)} {title}", fontsize="medium", loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(classes)), [label_name(c, names) for c in classes], rotation=90,
                        fontsize=7 if len(classes) > 30 else 9)
    axes[-1].set_xlim(-0.7, len(classes) - 0.3)
    fig.suptitle(f"Dice per class {title} (box: spread over scans; dashed line 0.95)")
    return _save_png(fig, target)
