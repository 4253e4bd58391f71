#!/usr/bin/env python
"""Compare benchmark results (scripts 03-06) against the official TotalSegmentator run.

Reads ts-bench-result JSON files, and for every method and every scan also in the reference: speedup
(reference median latency / method median latency), voxel agreement and per-class Dice of the method's mask
against the reference's, structures missing or extra; optionally Dice against ground-truth label maps.
Masks are compared in world space: a mask stored in another axis order or direction on the same voxel grid
(a DICOM scan: the official tool's mask is LAS, ours LPS) is reoriented to the reference's first; masks on
really different grids get no Dice and one line saying what differs (shape, spacing, origin or direction).
Writes comparison.md, comparison.json and PNG plots into --out-dir.

Example:
    python 07_compare_vanilla_vs_optimized.py
    python 07_compare_vanilla_vs_optimized.py --results benchmarks/03_vanilla.json benchmarks/05_optimized.json \\
        --ground-truth ct_data/labels
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli.args import OneLineParser, check_outputs, run_script
from common.core.errors import InputError
from common.core.paths import BENCHMARKS
from common.reporting.comparison_inputs import DEFAULT_RESULT_FILES, REFERENCE_METHOD, default_result_paths


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 report written, 2 bad input (the message names the file).",
    )
    parser.add_argument(
        "--results", nargs="+", metavar="RESULT.json", type=Path,
        help="result files to compare (default: those of benchmarks/" + ", ".join(DEFAULT_RESULT_FILES)
             + " that exist; absent ones are skipped with a note)")
    parser.add_argument(
        "--reference", metavar="FILE_OR_METHOD",
        help=f"the reference: a result file or a method name (default: the result whose method is "
             f"{REFERENCE_METHOD!r}, i.e. script 03; else the first result)")
    parser.add_argument(
        "--ground-truth", metavar="DIR", type=Path,
        help="folder of ground-truth label maps named <scan_id>.nii.gz, <scan_id>_labels.nii.gz or "
             "<scan_id>_seg.nii.gz; adds Dice vs ground truth for every method (reference included)")
    parser.add_argument(
        "--out-dir", metavar="DIR", type=Path, default=BENCHMARKS,
        help="where to write comparison.md, comparison.json and the plots (default: benchmarks/)")
    parser.add_argument(
        "--cohort", metavar="COHORT.json", type=Path, default=None,
        help="a cohort benchmark result (cohort_benchmark.py) to add as the 'Cohort' table (default: "
             "benchmarks/cohort.json when it exists)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from common.reporting.report import run_comparison  # pandas and matplotlib: not needed for --help

    try:  # the output folder is checked before the result files are read
        check_outputs(folders=(args.out_dir,))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    notes: list[str] = []
    if args.results:
        paths = list(args.results)
    else:
        paths, notes = default_result_paths(BENCHMARKS)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    try:
        from common.reporting.report_cohort import read_cohort

        cohort_path = args.cohort or (BENCHMARKS / "cohort.json" if (BENCHMARKS / "cohort.json").exists() else None)
        cohort = read_cohort(cohort_path) if cohort_path else None
        doc, written = run_comparison(paths, args.out_dir, reference=args.reference,
                                      ground_truth=args.ground_truth, notes=notes, cohort=cohort)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"reference: {doc.reference.label} ({doc.reference.file})")
    for label, m in doc.methods.items():
        if m.is_reference:
            continue
        speed = "—" if m.speedup_total is None else f"{m.speedup_total:.2f}x"
        agree = "—" if m.mean_voxel_agreement is None else f"{100 * m.mean_voxel_agreement:.3f} %"
        rss = "" if m.median_rss_ratio is None else f", median peak RSS vs ref {100 * m.median_rss_ratio:.0f} %"
        arith = "" if m.arithmetic == "exact" else f" [{m.arithmetic.upper()}]"
        print(f"{label}{arith}: speedup {speed}, voxel agreement {agree}{rss}, scans ok {m.n_ok}/{m.n_scans}")
    for w in doc.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
