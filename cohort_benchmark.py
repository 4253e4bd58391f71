#!/usr/bin/env python
"""Cohort benchmark (issue 27): >= 10 scans of mixed sizes (1 to 16 tiles, one a DICOM series), built at run time
from the shared CT, segmented end to end by the official tool (a fresh process per scan, via 03), totalseg-fast
in folder mode, 06, and 06 on a Dask LocalCluster; each method once, in its own fresh process.

Writes --result (default benchmarks/cohort.json): per method the wall time, scans per hour, scans per core-hour
and the peak RSS of its process tree; 07 renders it as a table (--cohort). Outputs of the methods go under --work.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli.args import fail, positive_int, run_script, script_parser
from common.core.paths import BENCHMARKS


def build_parser() -> argparse.ArgumentParser:
    from common.runs.cohort import DEFAULT_METHODS, METHODS

    p = script_parser(__doc__)
    p.add_argument("--shared-ct", type=Path, default=Path(__file__).resolve().parent.parent / "shared/data/ct",
                   help="folder with example_ct.nii.gz and example_ct_sm.nii.gz (default ../shared/data/ct)")
    p.add_argument("--work", type=Path, default=BENCHMARKS / "cohort", help="cohort and method outputs")
    p.add_argument("--result", type=Path, default=BENCHMARKS / "cohort.json", help="the result JSON")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, of {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)}; 06-bf16 "
                        "is the APPROXIMATE bf16 network)")
    p.add_argument("--weights", choices=["standin", "official"], default="standin")
    p.add_argument("--small", action="store_true", help="a 4-scan cohort of crops (a smoke test)")
    p.add_argument("--timeout", type=positive_int, default=4 * 3600, help="seconds per method (default 4 h)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from common.core.atomic import atomic_write_json
    from common.core.machine import machine_info
    from common.runs.cohort import METHODS, build_cohort, run_method, speedups

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        return fail(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    cohort_dir = args.work / "scans"
    if cohort_dir.exists() and any(cohort_dir.iterdir()):
        return fail(f"{cohort_dir} is not empty: remove it or choose another --work")
    try:
        scans = build_cohort(args.shared_ct, cohort_dir, small=args.small)
    except (OSError, ValueError) as exc:
        return fail(exc)
    print(f"cohort: {len(scans)} scans, {sum(s.tiles for s in scans)} tiles ({cohort_dir})")
    doc = {"schema": "ts-bench-cohort", "schema_version": 1, "machine": machine_info(), "weights": args.weights,
           "cohort": [{"path": str(s.path), "made_from": s.made_from, "tiles": s.tiles} for s in scans],
           "methods": []}
    for m in methods:
        rec = run_method(m, cohort_dir, args.work / m, args.weights, len(scans), args.timeout)
        doc["methods"].append(rec)
        speedups(doc["methods"])
        atomic_write_json(args.result, doc)
        print(f"{m}: {rec['wall_s']:.1f} s, {rec['scans_ok']}/{len(scans)} ok, {rec['scans_per_hour']:.0f} scans/h, "
              f"peak RSS {rec['peak_rss_bytes'] / 2**30:.2f} GiB (exit {rec['exit_code']})")
    print(f"result: {args.result}")
    return 0 if all(r["exit_code"] == 0 for r in doc["methods"]) else 1


if __name__ == "__main__":
    sys.exit(run_script(main))
