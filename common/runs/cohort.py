"""A cohort benchmark (issue 27, item 7): many scans of mixed sizes, end to end, in scans per hour.

The cohort is built at run time from the shared CT (``build_cohort``): the real scans, a reoriented copy,
realistic-size and clinical-size variants (1 to 16 tiles), and one DICOM series. Each method then segments
the whole folder as its users run it, in a fresh process (``run_method``):

* ``official``: 03, the official TotalSegmentator python API in a fresh isolated worker per scan;
* ``totalseg-fast``: our drop-in in folder mode (one model load, the default per-class masks);
* ``06``: stage 06 (label map + passport per scan), in one process;
* ``06-dask``: 06 on a Dask LocalCluster (``--workers <cores> --threads 1``);
* ``06-bf16``: 06 with the approximate bf16 network (only when asked for: it is not exact mode).

Recorded per method: wall time (s, the process from start to exit), scans ok, scans per hour, scans per
core-hour (cores: this process's usable cores) and the peak RSS of the whole process tree (sampled every
``SAMPLE_S`` seconds with psutil: RSS summed over the process and all its children, the largest sum seen).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from common.core.machine import usable_cores
from common.core.paths import PROJECT_ROOT as ROOT
from common.inference.tile_count import task297_geometry, tiles_for_geometry
from common.sources.dicom_write import write_dicom_series
from common.sources.variants import clinical_variant, realistic_variant, reorient

SAMPLE_S = 0.25
METHODS = ("official", "totalseg-fast", "06", "06-dask", "06-bf16")
DEFAULT_METHODS = ("official", "totalseg-fast", "06", "06-dask")
CLINICAL_Z = (80, 120, 200, 300, 500)  # 512 x 512 x z at 0.98 x 0.98 x 2 mm: about 3 to 16 tiles


@dataclass(frozen=True)
class CohortScan:
    """One scan of the cohort: its path (a NIfTI file or a DICOM folder), what it was made from, and its
    sliding-window tiles (computed from the header)."""

    path: Path
    made_from: str
    tiles: int


def _tiles(img: nib.Nifti1Image) -> int:
    return tiles_for_geometry(img.shape[:3], img.header.get_zooms()[:3],
                              orientation="".join(nib.aff2axcodes(img.affine)), **task297_geometry())


def build_cohort(shared_ct: Path, folder: Path, clinical_z: tuple[int, ...] = CLINICAL_Z,
                 small: bool = False) -> list[CohortScan]:
    """Write the cohort into ``folder`` (new or empty): from ``shared_ct``'s example_ct.nii.gz and
    example_ct_sm.nii.gz the two scans, an LPS copy, two realistic-size variants, a DICOM series of
    example_ct_sm, and one clinical-size variant per ``clinical_z`` (11 scans by default). ``small``: crops of
    the two scans only (4 scans incl. the DICOM series, for tests). Returns the scans in writing order."""
    folder.mkdir(parents=True, exist_ok=True)
    big, sm = nib.load(shared_ct / "example_ct.nii.gz"), nib.load(shared_ct / "example_ct_sm.nii.gz")
    if small:
        big, sm = big.slicer[40:80, 30:62, 0:40], sm.slicer[40:80, 30:62, 0:30]
    made: list[tuple[str, nib.Nifti1Image, str]] = [("example_ct", big, "example_ct"),
                                                    ("example_ct_sm", sm, "example_ct_sm"),
                                                    ("example_ct_lps", reorient(big, "LPS"), "example_ct, LPS")]
    if not small:
        made += [("example_ct_realistic", realistic_variant(big), "example_ct at 0.8 x 0.8 x 1.5 mm"),
                 ("example_ct_sm_realistic", realistic_variant(sm), "example_ct_sm at 0.8 x 0.8 x 1.5 mm")]
        made += [(f"clinical_512x512x{z}", clinical_variant(big, shape=(512, 512, z)),
                  f"example_ct, clinical 512x512x{z} at 0.98 x 0.98 x 2 mm") for z in clinical_z]
    scans = []
    for name, img, source in made:
        path = folder / f"{name}.nii.gz"
        nib.save(img, path)
        scans.append(CohortScan(path, source, _tiles(img)))
    dicom = folder / "example_ct_sm_dicom"
    write_dicom_series(sm, dicom)
    scans.append(CohortScan(dicom, "example_ct_sm as a DICOM series", _tiles(sm)))
    return scans


def method_command(method: str, cohort: Path, out: Path, weights: str, cores: int) -> list[str]:
    """The command line of ``method`` on the cohort folder, writing under ``out``."""
    py = sys.executable
    if method == "official":
        return [py, str(ROOT / "03_vanilla_benchmark.py"), "--input", str(cohort), "--out", str(out / "masks"),
                "--result", str(out / "result.json"), "--repeats", "1", "--warmup", "0", "--weights", weights]
    if method == "totalseg-fast":
        exe = Path(sys.executable).with_name("totalseg-fast")  # the installed command, as users run it
        cmd = [str(exe)] if exe.exists() else [py, "-m", "common.cli.console"]
        return [*cmd, "-i", str(cohort), "-o", str(out / "masks"), "--weights", weights]
    six = [py, str(ROOT / "06_inferenceAndPassport.py"), "--input", str(cohort), "--out", str(out / "masks"),
           "--result", str(out / "result.json"), "--force", "--weights", weights]
    if method == "06":
        return six
    if method == "06-dask":
        return [*six, "--workers", str(cores), "--threads", "1"]  # a LocalCluster of single-thread workers
    if method == "06-bf16":
        return [*six, "--precision", "bf16"]
    raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")


def _tree_rss(proc) -> int:
    """RSS in bytes of a psutil.Process and all its living children, summed."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # ended between listing and reading
            pass
    return total


def run_method(method: str, cohort: Path, out: Path, weights: str, n_scans: int, timeout_s: float) -> dict:
    """Run ``method`` once on the cohort (a fresh process, stdout and stderr into ``out``/log.txt): its record
    {"method", "command", "exit_code", "wall_s", "scans", "scans_ok", "scans_per_hour", "scans_per_core_hour",
    "cores", "peak_rss_bytes", "peak_rss_method", "timed_out"}."""
    import psutil

    cores = usable_cores()
    out.mkdir(parents=True, exist_ok=True)
    cmd = method_command(method, cohort, out, weights, cores)
    peak, timed_out = 0, False
    with open(out / "log.txt", "wb") as log:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())
        proc = psutil.Process(child.pid)
        while child.poll() is None:
            peak = max(peak, _tree_rss(proc))
            if time.perf_counter() - t0 > timeout_s:
                timed_out = True
                for p in [*proc.children(recursive=True), proc]:  # the run's own process tree only
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                child.wait()
                break
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - t0
    ok = _scans_ok(method, out, n_scans, child.returncode)
    return {"method": method, "command": cmd, "exit_code": child.returncode, "wall_s": wall, "scans": n_scans,
            "scans_ok": ok, "scans_per_hour": ok / wall * 3600 if wall > 0 else None,
            "scans_per_core_hour": ok / wall * 3600 / cores if wall > 0 else None, "cores": cores,
            "peak_rss_bytes": peak, "peak_rss_method": f"psutil, RSS of the process tree summed, every {SAMPLE_S} s",
            "timed_out": timed_out}


def _scans_ok(method: str, out: Path, n_scans: int, code: int | None) -> int:
    """Scans the method segmented: its result JSON's ok scans, or for totalseg-fast the scan folders with masks
    (all of them on exit 0)."""
    result = out / "result.json"
    if result.exists():
        scans = json.loads(result.read_text(encoding="utf-8")).get("scans", [])
        return sum(1 for s in scans if s.get("status") == "ok")
    if method == "totalseg-fast":
        masks = out / "masks"
        done = [d for d in masks.iterdir() if d.is_dir() and any(d.glob("*.nii.gz"))] if masks.is_dir() else []
        return len(done) if done or code != 0 else 0
    return 0


def speedups(records: list[dict], reference: str = "official") -> None:
    """Add "x_reference_scans_per_hour" (method / reference) to each record, in place, when the reference ran."""
    ref = next((r for r in records if r["method"] == reference and r.get("scans_per_hour")), None)
    for r in records:
        r["x_reference_scans_per_hour"] = (r["scans_per_hour"] / ref["scans_per_hour"]
                                           if ref and r.get("scans_per_hour") else None)
