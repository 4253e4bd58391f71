"""Benchmark: our python API (common.python_api.totalsegmentator) on a batch of scans against a loop of the official
python API (totalsegmentator.python_api.totalsegmentator, fast=True) over the same scans, as a user's script runs
them: one process each, calls one after the other, ``ml=True`` into a label map file per scan.

    python -m common.cli.bench_api --input ct_data/example_ct.nii.gz --input ct_data/clinical/... [--weights standin]

- ours: a fresh ``python`` process importing common.python_api and calling it once per scan (the model session is
  built on the first call and reused);
- official: a fresh isolated worker (common.runs.official) calling the official function once per scan (it
  loads the model on every call, as it does for its users).
Per side: wall time of the whole process (imports, model load, every scan), time per call, scans per hour
(scans / wall), peak RSS (ours: ru_maxrss of the child; official: the worker's self + children). Each scan's
two label maps are compared (voxel agreement). Writes benchmarks/api_vs_official.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from common.cli.args import OneLineParser, run_script
from common.cli.bench_console import run_child
from common.core.atomic import atomic_write_json
from common.core.machine import library_versions, machine_info
from common.core.paths import PROJECT_ROOT

DEFAULT_RESULT = PROJECT_ROOT / "benchmarks" / "api_vs_official.json"


def worker(scans: list[Path], out: Path, weights: str, times: Path) -> int:
    """The ours side, in its own process: one API call per scan; per-call seconds written to ``times``."""
    from common.python_api import totalsegmentator

    seconds = []
    for k, scan in enumerate(scans):
        t0 = time.perf_counter()
        totalsegmentator(scan, out / f"{k:03d}.nii.gz", ml=True, device="cpu", quiet=True, weights=weights)
        seconds.append(time.perf_counter() - t0)
    times.write_text(json.dumps(seconds), encoding="utf-8")
    return 0


def _official(scans: list[Path], out: Path, weights: str) -> dict:
    from common.inference.weights import ensure_task297
    from common.runs.official import OfficialRunner

    folder = ensure_task297(weights, log=lambda m: None)
    t0 = time.perf_counter()
    calls = []
    with OfficialRunner(folder) as runner:
        for k, scan in enumerate(scans):
            calls.append(runner.segment(scan, out / f"{k:03d}.nii.gz", ml=True, timeout_s=3600))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "call_s": [c.total_s for c in calls],
            "peak_rss_bytes": max(c.peak_rss_bytes for c in calls)}


def _side(wall: float, calls: list[float], rss: int, n: int) -> dict:
    return {"wall_s": wall, "call_s": calls, "median_call_s": statistics.median(calls), "min_call_s": min(calls),
            "max_call_s": max(calls), "scans_per_hour": 3600.0 * n / wall, "peak_rss_bytes": rss}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m common.cli.bench_api", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, action="append", required=True, help="a scan (repeatable)")
    p.add_argument("--weights", choices=("auto", "official", "standin"), default="auto")
    p.add_argument("--result", type=Path, default=DEFAULT_RESULT, help="JSON output (default: %(default)s)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the ours side
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return worker(args.input, args.worker.parent, args.weights, args.worker)
    missing = [s for s in args.input if not s.exists()]
    if missing:
        print(f"error: {missing[0]}: not found (make scans with 01_download_data.py --clinical)", file=sys.stderr)
        return 2
    from common.inference.model_cache import prepare_model

    spec = prepare_model(args.weights, log=lambda m: None)
    n = len(args.input)
    with tempfile.TemporaryDirectory(prefix="bench-api-", dir=PROJECT_ROOT / "benchmarks") as tmp:
        ours_dir, theirs_dir = Path(tmp) / "ours", Path(tmp) / "official"
        ours_dir.mkdir()
        theirs_dir.mkdir()
        cmd = [sys.executable, "-m", "common.cli.bench_api", "--weights", args.weights,
               "--worker", str(ours_dir / "times.json"), *[x for s in args.input for x in ("--input", str(s))]]
        wall, rss = run_child(cmd)
        ours = _side(wall, json.loads((ours_dir / "times.json").read_text(encoding="utf-8")), rss, n)
        print(f"ours: {wall:.1f} s for {n} scans ({ours['scans_per_hour']:.0f}/h), peak RSS {rss / 2**30:.2f} GiB",
              flush=True)
        off = _official(args.input, theirs_dir, args.weights)
        theirs = _side(off["wall_s"], off["call_s"], off["peak_rss_bytes"], n)
        print(f"official: {off['wall_s']:.1f} s ({theirs['scans_per_hour']:.0f}/h), peak RSS "
              f"{off['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        rows = []
        for k, scan in enumerate(args.input):
            a = np.asanyarray(nib.load(ours_dir / f"{k:03d}.nii.gz").dataobj)
            b = np.asanyarray(nib.load(theirs_dir / f"{k:03d}.nii.gz").dataobj)
            rows.append({"scan": str(scan), "shape": list(nib.load(scan).shape), "ours_call_s": ours["call_s"][k],
                         "official_call_s": theirs["call_s"][k], "voxel_agreement": float((a == b).mean())})
    doc = {"schema": "ts-bench-api-vs-official", "schema_version": 1, "machine": machine_info(),
           "versions": library_versions(), "model": spec.provenance(), "n_scans": n,
           "timing": "wall time of each side's whole process (imports, model load, every call)",
           "ours": ours, "official": theirs, "speedup_scans_per_hour": ours["scans_per_hour"] / theirs["scans_per_hour"],
           "rows": rows}
    atomic_write_json(args.result, doc)
    for r in rows:
        print(f"{Path(r['scan']).name} {r['shape']}: ours {r['ours_call_s']:.1f} s, official {r['official_call_s']:.1f}"
              f" s, agreement {100 * r['voxel_agreement']:.3f} %")
    print(f"speedup (scans per hour): {doc['speedup_scans_per_hour']:.2f}x; result: {args.result}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
