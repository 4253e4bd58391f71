"""Benchmark: totalseg-fast against 06 on the same scans, as whole processes (what a user waits for).

    python -m common.cli.bench_console [--input ct_data/clinical/clinical_512x512x200.nii.gz] [--repeats 3]

Each repeat runs, in turn (alternating, so that drift in the machine hits all alike):
- ``06`` with ``--no-passport`` (one label map), the reference;
- ``totalseg-fast --ml`` (one label map with the official extension: the same work as 06);
- ``totalseg-fast`` default (117 per-class masks, as the official tool writes them);
- with ``--official``: the official TotalSegmentator with its own default output (117 per-class masks, ``ml=False``)
  in a fresh isolated worker (common.runs.official), timed from the worker's start to its end (imports, model
  load, segment, its writer), peak RSS the worker's self + children.
Per process: wall time in s (start to exit, imports and model load included) and peak resident memory in bytes
(ru_maxrss of that child alone, from os.wait4). The label maps of 06 and ``--ml`` must be identical voxel for
voxel (checked each repeat), and with ``--official`` every per-class mask of totalseg-fast is compared with the
official one (voxel agreement). Writes benchmarks/console_vs_06.json: medians, min, max, the ratio to 06's median
(and the official median over totalseg-fast's, the speedup), machine, library versions and the weights used.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from common.cli.args import OneLineParser, positive_int, run_script
from common.core.atomic import atomic_write_json
from common.core.machine import library_versions, machine_info
from common.core.paths import PROJECT_ROOT
from common.records.metrics import voxel_agreement

ROOT = PROJECT_ROOT
DEFAULT_SCAN = ROOT / "ct_data" / "clinical" / "clinical_512x512x200.nii.gz"
DEFAULT_RESULT = ROOT / "benchmarks" / "console_vs_06.json"
TIMEOUT_S = 1800
OFFICIAL = "official TotalSegmentator (117 masks)"
PER_CLASS = "totalseg-fast (117 masks)"


def run_child(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; return (wall s, peak RSS bytes of that child). Raises RuntimeError when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = t0 + TIMEOUT_S
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{cmd[1]}: no exit within {TIMEOUT_S} s")
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} exited {proc.returncode}: {err.strip().splitlines()[-1:]}")
    return wall, usage.ru_maxrss * 1024  # kB on Linux


def _variants(scan: Path, work: Path, weights: str) -> dict[str, tuple[list[str], Path]]:
    exe = str(Path(sys.executable).parent / "totalseg-fast")
    py = sys.executable
    return {
        "06 --no-passport": ([py, str(ROOT / "06_inferenceAndPassport.py"), "--input", str(scan), "--out",
                              str(work / "06"), "--result", str(work / "06.json"), "--no-passport", "--force",
                              "--weights", weights], work / "06" / f"{scan.name.split('.')[0]}_seg.nii.gz"),
        "totalseg-fast --ml": ([exe, "-i", str(scan), "-o", str(work / "ml.nii.gz"), "--ml", "-q", "--weights",
                                weights], work / "ml.nii.gz"),
        PER_CLASS: ([exe, "-i", str(scan), "-o", str(work / "masks"), "-q", "--weights", weights],
                                      work / "masks"),
    }


def run_official_masks(scan: Path, out: Path, weights: str) -> tuple[float, int]:
    """The official tool's default output (one mask per class into the folder ``out``) in a fresh isolated worker;
    return (wall s from the worker's start to its end, peak RSS bytes of the worker and its children)."""
    from common.inference.weights import ensure_task297
    from common.runs.official import OfficialCallError, OfficialRunner, time_limit_for

    folder = ensure_task297(weights, log=lambda m: None)
    t0 = time.perf_counter()
    try:
        with OfficialRunner(folder) as runner:
            call = runner.segment(scan, out, ml=False, timeout_s=time_limit_for(scan))
    except OfficialCallError as exc:
        raise RuntimeError(str(exc)) from exc
    return time.perf_counter() - t0, call.peak_rss_bytes


def mask_agreement(ours: Path, official: Path) -> dict:
    """Voxel agreement of two folders of per-class masks (the same file names): the share of (voxel, class) pairs
    that agree, and the number of classes whose masks differ at all."""
    names = sorted(p.name for p in official.glob("*.nii.gz"))
    ours_names = sorted(p.name for p in ours.glob("*.nii.gz"))
    if names != ours_names:
        raise RuntimeError(f"{ours}: {len(ours_names)} mask files against the official {len(names)}, or other names")
    agreements, sizes = [], []
    for name in names:
        a = np.asanyarray(nib.load(ours / name).dataobj) > 0
        b = np.asanyarray(nib.load(official / name).dataobj) > 0
        agreements.append(voxel_agreement(a, b))  # raises on another shape
        sizes.append(a.size)
    return {"classes": len(names), "classes_differing": sum(v < 1.0 for v in agreements),
            "voxel_agreement": float(np.average(agreements, weights=sizes))}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m common.cli.bench_console", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, action="append",
                   help=f"a NIfTI scan (repeatable; default: {DEFAULT_SCAN.relative_to(ROOT)})")
    p.add_argument("--repeats", type=positive_int, default=3, help="runs of each command (default: %(default)s)")
    p.add_argument("--weights", choices=("auto", "official", "standin"), default="auto",
                   help="passed to both commands (default: %(default)s)")
    p.add_argument("--result", type=Path, default=DEFAULT_RESULT, help="JSON output (default: %(default)s)")
    p.add_argument("--official", action="store_true",
                   help="also run the official TotalSegmentator with its default per-class output, each repeat")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scans = args.input or [DEFAULT_SCAN]
    for scan in scans:
        if not scan.is_file():
            print(f"error: {scan}: file not found (make it with 01_download_data.py --clinical)", file=sys.stderr)
            return 2
    from common.inference.model_cache import prepare_model

    spec = prepare_model(args.weights, log=lambda m: None)
    rows = []
    for scan in scans:
        runs: dict[str, list[tuple[float, int]]] = {}
        agreements: list[dict] = []  # per repeat, with --official
        with tempfile.TemporaryDirectory(prefix="bench-console-", dir=ROOT / "benchmarks") as tmp:
            variants = _variants(scan, Path(tmp), args.weights)
            for rep in range(args.repeats):
                for name, (cmd, _) in variants.items():
                    try:
                        wall, rss = run_child(cmd)
                    except RuntimeError as exc:
                        print(f"error: {scan}: {exc}", file=sys.stderr)
                        return 1
                    runs.setdefault(name, []).append((wall, rss))
                    print(f"{scan.name} repeat {rep + 1}/{args.repeats}: {name}: {wall:.1f} s, "
                          f"peak RSS {rss / 2**30:.2f} GiB", flush=True)
                if args.official:
                    try:
                        wall, rss = run_official_masks(scan, Path(tmp) / "official", args.weights)
                        agreement = mask_agreement(variants[PER_CLASS][1], Path(tmp) / "official")
                    except (RuntimeError, ValueError) as exc:
                        print(f"error: {scan}: {exc}", file=sys.stderr)
                        return 1
                    runs.setdefault(OFFICIAL, []).append((wall, rss))
                    agreements.append(agreement)
                    print(f"{scan.name} repeat {rep + 1}/{args.repeats}: {OFFICIAL}: {wall:.1f} s, peak RSS "
                          f"{rss / 2**30:.2f} GiB; per-class masks agree on {100 * agreement['voxel_agreement']:.5f} % "
                          f"of (voxel, class) pairs ({agreement['classes_differing']} of {agreement['classes']} "
                          f"classes differ somewhere)", flush=True)
                ref = np.asanyarray(nib.load(variants["06 --no-passport"][1]).dataobj)
                ml = np.asanyarray(nib.load(variants["totalseg-fast --ml"][1]).dataobj)
                if not np.array_equal(ref, ml):
                    print(f"error: {scan}: the label maps of 06 and totalseg-fast --ml differ "
                          f"({int((ref != ml).sum())} voxels)", file=sys.stderr)
                    return 1
        ref_median = statistics.median(w for w, _ in runs["06 --no-passport"])
        for name, vals in runs.items():
            walls = [w for w, _ in vals]
            extra = {}
            if OFFICIAL in runs and name == PER_CLASS:
                extra = {"speedup_vs_official": statistics.median(w for w, _ in runs[OFFICIAL])
                         / statistics.median(walls),  # the worst repeat's mask agreement
                         "masks_vs_official": min(agreements, key=lambda a: a["voxel_agreement"])}
            rows.append({**extra, "scan": str(scan), "shape": list(nib.load(scan).shape), "command": name,
                         "wall_s": walls, "median_wall_s": statistics.median(walls), "min_wall_s": min(walls),
                         "max_wall_s": max(walls), "ratio_to_06": statistics.median(walls) / ref_median,
                         "peak_rss_bytes": max(r for _, r in vals),
                         "label_map_checked_identical_to_06": name not in (PER_CLASS, OFFICIAL)})
    doc = {"schema": "ts-bench-console-vs-06", "schema_version": 1, "machine": machine_info(),
           "versions": library_versions(), "model": spec.provenance(), "repeats": args.repeats,
           "timing": "wall time of each process, start to exit (imports, model load, load, segment, write)",
           "peak_rss_method": "ru_maxrss of the child process (os.wait4)", "rows": rows}
    atomic_write_json(args.result, doc)
    for r in rows:
        print(f"{Path(r['scan']).name}: {r['command']}: median {r['median_wall_s']:.1f} s "
              f"[{r['min_wall_s']:.1f}-{r['max_wall_s']:.1f}], x{r['ratio_to_06']:.3f} of 06, "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
              + (f", {r['speedup_vs_official']:.2f}x the official tool" if "speedup_vs_official" in r else ""))
    print(f"result: {args.result}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
