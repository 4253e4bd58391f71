"""Run a comparison of benchmark results (ts-bench-result files) against a reference: load, compare, then write
the PNG plots, comparison.json and comparison.md (common.reporting.comparison builds the document; common.reporting.report_plots
and common.reporting.report_markdown only draw and render it)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from common.core.atomic import atomic_write_json, atomic_write_text
from common.core.errors import InputError
from common.core.text import one_line
from common.records.results import MAX_ERROR_CHARS
from common.reporting.comparison import compare
from common.reporting.comparison_doc import ComparisonDoc
from common.reporting.comparison_inputs import REFERENCE_METHOD, choose_reference, load_entries
from common.reporting.report_cohort import render_cohort
from common.reporting.report_markdown import render_markdown
from common.reporting.report_plots import plot_dice, plot_latency, plot_stages

PLOT_FILES = {
    "latency": "comparison_latency.png",
    "stages": "comparison_stages.png",
    "dice": "comparison_dice.png",
    "dice_ground_truth": "comparison_dice_ground_truth.png",
}
PLOTTERS: dict[str, Callable[[ComparisonDoc, Path], Path | None]] = {
    "latency": plot_latency,
    "stages": plot_stages,
    "dice": lambda doc, t: plot_dice(doc, t, "dice", "vs reference"),
    "dice_ground_truth": lambda doc, t: plot_dice(doc, t, "gt_dice", "vs ground truth"),
}


def write_report(doc: ComparisonDoc, out_dir: str | Path,
                 cohort: dict | None = None) -> tuple[ComparisonDoc, dict[str, Path]]:
    """Draw the PNG plots into ``out_dir``, then write comparison.json and comparison.md (all atomically) of the
    document completed with the plots drawn and a note per plot without data; ``cohort`` (a cohort benchmark
    result) adds its table to the Markdown and its document to the JSON ("cohort"). Returns that document and
    the paths written; ``doc`` itself is left as it is."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plots: dict[str, str] = {}
    notes: list[str] = []
    for key, draw in PLOTTERS.items():
        if key == "dice_ground_truth" and doc.ground_truth is None:
            continue
        path = draw(doc, out_dir / PLOT_FILES[key])
        if path is not None:
            plots[key] = PLOT_FILES[key]
            written[key] = path
        else:
            notes.append(f"plot {PLOT_FILES[key]} not drawn: no data")
    final = dataclasses.replace(doc, plots=plots, notes=[*doc.notes, *notes])
    extra = {"cohort": cohort} if cohort else {}
    written["json"] = atomic_write_json(out_dir / "comparison.json", {**final.to_json(), **extra})
    text = render_markdown(final) + ("\n".join(["", *render_cohort(cohort)]) if cohort else "")
    written["markdown"] = atomic_write_text(out_dir / "comparison.md", text)
    return final, written


def run_comparison(result_paths: Sequence[str | Path], out_dir: str | Path, *, reference: str | None = None,
                   ground_truth: str | Path | None = None,
                   notes: Sequence[str] = (), cohort: dict | None = None) -> tuple[ComparisonDoc, dict[str, Path]]:
    """Load results, compare with the reference, write the report. InputError on bad inputs."""
    paths = list(result_paths)
    if reference and Path(reference).suffix == ".json" and Path(reference).exists():
        paths = [Path(reference), *paths]
    if not paths:
        raise InputError(None, "no result files to compare (run scripts 03-06 first or pass --results)")
    entries = load_entries(paths)
    ref = choose_reference(entries, reference)
    notes = list(notes)
    if reference is None and ref.method != REFERENCE_METHOD:
        notes.append(f"no result with method {REFERENCE_METHOD!r}: {ref.label} ({ref.path}) is the reference")
    gt_dir = None
    if ground_truth is not None:
        gt_dir = Path(ground_truth)
        if not gt_dir.is_dir():
            raise InputError(gt_dir, "ground-truth folder not found")
    for e in entries:
        for rec in e.result["scans"]:
            if rec["status"] != "ok":
                notes.append(f"{e.label}: {rec['scan_id']} failed: {one_line(rec.get('error') or '', MAX_ERROR_CHARS)}")
    return write_report(compare(entries, ref, gt_dir, notes), out_dir, cohort)
