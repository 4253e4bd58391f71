"""The comparison document as Markdown (rendering only; nothing is computed here but formatting).

Times are shown in seconds, memory in GiB, voxel agreement in %, Dice as fractions 0..1.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.records.metrics import DICE_BUCKETS
from common.records.results import STAGES
from common.reporting.comparison_doc import STANDIN_WARNING, ComparisonDoc, Row


def fmt_s(x: float | None) -> str:
    """Seconds: 3 decimals below 1 s, 2 below 100 s, else 1."""
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_rate(x: float | None) -> str:
    """Mvoxel/s: 3 decimals, 3 significant digits below 0.01."""
    return "—" if x is None else f"{x:.3f}" if x >= 0.01 else f"{x:.3g}"


def fmt_speedup(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def fmt_gib(n_bytes: float | None) -> str:
    """Bytes as GiB with 2 decimals."""
    return "—" if n_bytes is None else f"{n_bytes / 2**30:.2f}"


def fmt_ratio(x: float | None) -> str:
    """A ratio such as the RSS of a method / the reference's, as a percentage without decimals."""
    return "—" if x is None else f"{100 * x:.0f} %"


def fmt_pct(frac: float | None) -> str:
    """A fraction 0..1 as a percentage with 3 decimals."""
    return "—" if frac is None else f"{100 * frac:.3f}"


def fmt_dice(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _names_cell(names: list[str] | None, limit: int = 4) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column (l/r/c)."""
    align = align or "l" * len(header)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_esc(h) for h in header) + " |",
             "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(_esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(doc: ComparisonDoc) -> str:
    """The Markdown report of a comparison document (first line: the stand-in warning when it applies)."""
    out = _warning_lines(doc) + _title_lines(doc)
    for section in (_inputs_section, _summary_section, _per_scan_section, render_size_and_memory,
                    _stage_times_section, _ground_truth_section, _plots_section, _notes_section):
        out += section(doc)
    return "\n".join(out).rstrip() + "\n"


def _warning_lines(doc: ComparisonDoc) -> list[str]:
    """Markdown lines: the stand-in warning and the document's other warnings as one block quote, then a blank
    line; no lines when there is nothing to warn about."""
    out: list[str] = []
    if doc.models.standin:
        out += [STANDIN_WARNING, ">"]
    for w in doc.warnings:
        if not w.startswith("Stand-in weights"):
            out += [f"> **{w}**", ">"]
    if out:
        out[-1] = ""
    return out


def _title_lines(doc: ComparisonDoc) -> list[str]:
    """Markdown lines: the title, what generated the document and its reference, and the reference machine."""
    ref = doc.reference
    out = ["# TotalSegmentator fast model: vanilla vs optimized", "",
           f"Generated {doc.created} by 07_compare_vanilla_vs_optimized.py. "
           f"Reference: **{ref.label}** (`{ref.file}`). Speedup = reference median latency / method median "
           "latency on the same scan; voxel agreement and Dice compare each method's mask with the reference's.", ""]
    m0 = doc.machine
    out += [f"Machine (reference run): {m0.get('cpu_model')}, {m0.get('usable_cores')} usable of "
            f"{m0.get('logical_cores')} logical cores, {m0.get('ram_gib')} GiB RAM, {m0.get('os')}.", ""]
    return out


def _inputs_section(doc: ComparisonDoc) -> list[str]:
    """Markdown lines of "## Inputs": one row per results file compared."""
    out = ["## Inputs", ""]
    out.append(md_table(
        ["Method", "Script", "File", "Model", "Weights", "sha256", "Created"],
        [[i.label, i.script, f"`{i.file}`", i.model["name"], i.model["weights"],
          (str(i.model["sha256"])[:12] if i.model["sha256"] else "—"), i.created] for i in doc.inputs]))
    out.append("")
    return out


def _summary_section(doc: ComparisonDoc) -> list[str]:
    """Markdown lines of "## Summary per method": latency (s), throughput, speedup, agreement (%), Dice."""
    out = ["## Summary per method", ""]
    rows = []
    for label, m in doc.methods.items():
        lat = m.latency
        b = m.dice_buckets
        rows.append([
            label + (" (reference)" if m.is_reference else "")
            + (f" — **{m.arithmetic.upper()}**" if m.arithmetic != "exact" else ""),
            f"{m.n_ok}/{m.n_scans}",
            "—" if m.success_rate is None else f"{100 * m.success_rate:.1f} %",
            f"{fmt_s(lat['mean'])} / {fmt_s(lat['median'])} / {fmt_s(lat['p95'])}",
            fmt_rate(m.throughput_mvox_s),
            fmt_speedup(m.speedup_total),
            fmt_pct(m.mean_voxel_agreement),
            fmt_dice(m.mean_dice),
            "—" if not b or not m.n_dice else " / ".join(str(b[k]) for k in DICE_BUCKETS),
        ])
    out.append(md_table(
        ["Method", "Scans ok/total", "Success", "Latency mean / median / p95 (s)", "Throughput (Mvox/s)",
         "Speedup (total time)", "Voxel agreement % (mean)", "Mean Dice",
         "Dice classes >0.95 / 0.90–0.95 / 0.85–0.90 / <0.85"],
        rows, "lrrrrrrrr"))
    out += ["", "Latency statistics are over the per-scan median totals; throughput = scan voxels / median total. "
            "Speedup (total time) = sum of the reference's median totals / sum of the method's, over the scans both "
            "ran. Mean Dice averages the per-scan mean over classes present in either mask; the buckets count "
            "(scan, class) pairs.", ""]
    return out


def _per_scan_row(r: Row) -> list[str]:
    """One row of the per-scan table for one (scan, method) row of the document: latency in s, agreement in %."""
    lat = "failed" if r.status != "ok" else (
        f"{fmt_s(r.median_total_s)} [{fmt_s(r.min_total_s)}–{fmt_s(r.max_total_s)}]"
        if r.median_total_s is not None else "—")
    if r.is_reference:
        agree, dice, missing = "(reference)", "(reference)", "—"
    else:
        agree, dice = fmt_pct(r.voxel_agreement), fmt_dice(r.mean_dice)
        missing = "—" if r.missing is None else (
            f"missing: {_names_cell(r.missing)}; extra: {_names_cell(r.extra)}")
        if r.pair_error and r.voxel_agreement is None:
            agree = dice = "n/a"
    classes = f"{'—' if r.n_classes_ref is None else r.n_classes_ref} / " \
              f"{'—' if r.n_classes is None else r.n_classes}"
    return [r.scan_id, r.method, lat, fmt_speedup(r.speedup), agree, dice, classes, missing]


def _per_scan_section(doc: ComparisonDoc) -> list[str]:
    """Markdown lines of "## Per scan": one row per (scan, method), see ``_per_scan_row``."""
    out = ["## Per scan", ""]
    rows = [_per_scan_row(r) for r in doc.rows]
    out.append(md_table(["Scan", "Method", "Median latency (s) [min–max]", "Speedup vs ref", "Voxel agreement %",
                         "Mean Dice", "Classes ref / method", "Missing / extra"], rows, "llrrrrcl"))
    out.append("")
    return out


def _stage_times_section(doc: ComparisonDoc) -> list[str]:
    """Markdown lines of "## Stage times" (s) for the stages any method recorded; none when no method did."""
    present = [s for s in STAGES if any(s in m.stages_mean_s for m in doc.methods.values())]
    if not present:
        return []
    out = ["## Stage times (s, mean over scans of the per-scan medians)", ""]
    rows = [[label] + [fmt_s(m.stages_mean_s.get(s)) for s in present] + [fmt_s(m.total_mean_s)]
            for label, m in doc.methods.items()]
    out.append(md_table(["Method", *present, "total"], rows, "l" + "r" * (len(present) + 1)))
    out.append("")
    return out


def _ground_truth_section(doc: ComparisonDoc) -> list[str]:
    """Markdown lines of "## Dice vs ground truth" (quantiles of Dice 0..1 per method); none without ground truth."""
    if doc.ground_truth is None:
        return []
    gt = doc.ground_truth
    out = ["## Dice vs ground truth", ""]
    if doc.models.standin:
        out += ["Stand-in weights: these numbers measure nothing anatomical.", ""]
    out.append(f"Ground truth from `{gt.dir}`: {len(gt.found)} scan(s) found"
               + (f", missing for {', '.join(gt.missing)}" if gt.missing else "") + ".")
    out.append("")
    rows = []
    for label, m in doc.methods.items():
        g = m.ground_truth
        q = (g.gt_dice_quantiles if g else None) or {}
        rows.append([label, g.n_gt_dice if g else 0, *(fmt_dice(q.get(k)) for k in ("p10", "p25", "p50", "p75", "p90")),
                     fmt_dice(g.gt_mean_dice if g else None)])
    out.append(md_table(["Method", "(scan, class) pairs", "p10", "p25", "p50", "p75", "p90", "mean"], rows,
                        "lrrrrrrr"))
    out.append("")
    return out


def _titled(title: str, body: list[str]) -> list[str]:
    """Markdown lines of a "## title" section holding ``body``; none when the body is empty."""
    return ["## " + title, "", *body] if body else []


def _plots_section(doc: ComparisonDoc) -> list[str]:
    """Markdown lines of "## Plots": one image link per plot file; none without plots."""
    return _titled("Plots", [line for key, name in doc.plots.items() for line in (f"![{key}]({name})", "")])


def _notes_section(doc: ComparisonDoc) -> list[str]:
    """Markdown lines of "## Notes": one bullet per note; none without notes."""
    return _titled("Notes", [f"- {_esc(n)}" for n in doc.notes] + [""] if doc.notes else [])


def _efficiency_cell(eff: float | None) -> str:
    if eff is None:
        return "—"
    return f"{eff * 100:.0f} %" + (" (measurement error: faster than the limit)" if eff > 1 else "")


def _limits_and_approximation(doc: ComparisonDoc) -> list[str]:
    """Markdown lines: each method's compute limit and where it came from, and each approximate method's
    margin analysis; none when no method has either."""
    out = []
    for label, m in doc.methods.items():
        if m.limit:
            lim = m.limit
            out.append(f"- Compute limit of {_esc(label)}: {lim['limit_s_per_tile']:.2f} s per tile at "
                       f"{lim['peak_gflops']:.0f} GFLOPS ({lim['precision']}); source: {_esc(lim['source'])}")
        a = m.approximation
        if m.arithmetic != "exact":
            text = (f"largest logit error {a['max_abs_logit_error']:.3g} vs float32 on {a['tiles']} real CT tile(s); "
                    f"voxels whose exact top-2 margin is below it: {fmt_pct(a['fraction_margin_below_max_error'])} % "
                    f"(below the largest change of a logit difference: "
                    f"{fmt_pct(a['fraction_margin_below_max_pair_error'])} %); flipped in those tiles: "
                    f"{fmt_pct(a['fraction_flipped'])} %") if a and "max_abs_logit_error" in a else \
                "no margin analysis recorded"
            out.append(f"- **{_esc(label)} is {m.arithmetic.upper()}**: {text}.")
    return [*out, ""] if out else []


def render_size_and_memory(doc: ComparisonDoc) -> list[str]:
    """Markdown lines: time, peak RSS and tile count per scan, then the summary by size class."""
    if not doc.rows:
        return []
    out = ["## Time, memory and size per scan", ""]
    rows = []
    for r in doc.rows:
        tiles = "—" if r.n_tiles is None else str(r.n_tiles) + (
            " (est.)" if r.n_tiles_source == "estimated" else "")
        lat = "failed" if r.status != "ok" else fmt_s(r.median_total_s)
        rows.append([r.scan_id, tiles, r.method, lat,
                     "(reference)" if r.is_reference else fmt_speedup(r.speedup),
                     fmt_gib(r.peak_rss_bytes),
                     "(reference)" if r.is_reference else fmt_ratio(r.rss_ratio),
                     "—" if r.inference_s_per_tile is None else f"{r.inference_s_per_tile:.2f}",
                     _efficiency_cell(r.efficiency)])
    out.append(md_table(["Scan", "Tiles", "Method", "Median latency (s)", "Speedup vs ref", "Peak RSS (GiB)",
                         "RSS vs ref", "Inference s/tile", "Efficiency"], rows, "lrlrrrrrr"))
    out += ["", "Tiles: sliding-window tiles (112x112x128 at 3 mm, step 0.8) of the scan; (est.) = computed from "
            "the header for results that did not record it. Peak RSS: peak resident memory of the work on the "
            "scan, max over its timed runs (ours: this process's VmHWM reset before each run; the official "
            "tool: its isolated worker's, self + children). RSS vs ref = method / reference on the same scan. "
            "Inference s/tile: the inference stage (network + float16 accumulation) per tile; efficiency = the "
            "compute limit per tile (tile FLOPs counted from the ONNX graph / this machine's peak for the run's "
            "precision, measured by --efficiency with the fastest kernel available; its source below) / that "
            "time. Above 100 % the peak was measured too low: a measurement error, marked so.",
            "", *_limits_and_approximation(doc)]
    if doc.size_classes:
        out += ["## By size class", ""]
        rows = []
        for c in doc.size_classes:
            span = "—" if c.tiles_min is None else (
                str(c.tiles_min) if c.tiles_min == c.tiles_max else f"{c.tiles_min}–{c.tiles_max}")
            rows.append([c.size_class, c.method + (" (reference)" if c.is_reference else ""),
                         f"{c.n_ok}/{c.n_scans}", span, fmt_s(c.median_total_s),
                         "—" if c.is_reference else fmt_speedup(c.median_speedup),
                         fmt_gib(c.median_peak_rss_bytes),
                         "—" if c.is_reference else fmt_ratio(c.median_rss_ratio)])
        out.append(md_table(["Size class", "Method", "Scans ok/total", "Tiles", "Median latency (s)",
                             "Median speedup", "Median peak RSS (GiB)", "Median RSS vs ref"], rows, "llrrrrrr"))
        out.append("")
    return out
