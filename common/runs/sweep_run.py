"""05's sweep, run: the reference masks, one configuration timed and checked, and the whole search.

The candidates and the selection rule are common.runs.sweep's; this module times them on scans. Label arrays are
(x, y, z) as nibabel reads them; times are seconds.
"""
from __future__ import annotations

from pathlib import Path

from common.inference.model import ModelSpec
from common.inference.run_config import RunConfig
from common.runs.sweep import SweepRow, combine, one_factor_configs, qualifies, select_fastest


def _valid_tiles(scan: Path, spec: ModelSpec) -> int | None:
    """Tiles of a scan that loads and validates (common.imaging.validation.load_scan), else None."""
    from common.core.errors import InputError
    from common.imaging.validation import load_scan
    from common.inference.tile_count import tiles_for_image

    try:
        vol, _ = load_scan(scan)
    except InputError:
        return None
    return tiles_for_image(vol.image, spec)


def _header_tiles(scan: Path, spec: ModelSpec) -> int:
    """Tiles of a NIfTI scan from its header alone (0 when it cannot be read that way: DICOM, broken)."""
    import nibabel as nib

    from common.inference.tile_count import tiles_for_image

    try:
        return tiles_for_image(nib.load(str(scan)), spec)
    except Exception:  # only a preference: a scan that cannot be counted is simply not preferred
        return 0


def pick_sweep_scans(scans: list[Path], n: int, spec: ModelSpec) -> list[Path]:
    """The scans 05 sweeps on: the first ``n`` that load and validate; when all of them fit in one tile and a
    later scan needs more, the last pick is replaced by the later scan with the fewest tiles (> 1), because
    clinical-size CTs are what the choice must be right for (issue 9). Ordered by tiles, so that the warm-up
    on the first scan stays short. Invalid scans are skipped (the final benchmark reports them)."""
    picked: list[tuple[Path, int]] = []
    rest = list(scans)
    while rest and len(picked) < n:
        scan = rest.pop(0)
        tiles = _valid_tiles(scan, spec)
        if tiles is not None:
            picked.append((scan, tiles))
    if picked and all(t <= 1 for _, t in picked):
        larger = sorted((t, i, scan) for i, scan in enumerate(rest) if (t := _header_tiles(scan, spec)) > 1)
        for _, _, scan in larger:
            tiles = _valid_tiles(scan, spec)
            if tiles is not None:
                picked[-1] = (scan, tiles)
                break
    return [scan for scan, _ in sorted(picked, key=lambda st: st[1])]


def reference_masks(ref_json: Path, scans: list[Path], spec: ModelSpec, log=print) -> tuple[dict, str]:
    """Scan path -> reference label array: 03's masks when its result lists them, else the faithful
    PyTorch pipeline's output (identical to the official tool's: see tests/test_parity.py)."""
    import nibabel as nib
    import numpy as np

    from common.inference.predictors import TorchPredictor
    from common.inference.run_config import SegmentOptions
    from common.records.results import read_result
    from common.runs.scan_run import run_scan

    refs: dict[str, np.ndarray] = {}
    source = "faithful PyTorch pipeline"
    if ref_json.exists():
        res = read_result(ref_json)
        by_file = {str(Path(s["file"]).resolve()): s for s in res["scans"] if s["status"] == "ok" and s["mask"]}
        for scan in scans:
            rec = by_file.get(str(scan.resolve()))
            if rec and Path(rec["mask"]).exists():
                refs[str(scan)] = np.asanyarray(nib.load(rec["mask"]).dataobj)
        source = f"official masks from {ref_json}"
    missing = [s for s in scans if str(s) not in refs]
    if missing:
        log(f"reference: {len(missing)} scan(s) without 03 masks; using the faithful PyTorch pipeline for them")
        pred = TorchPredictor(spec.build_network())
        for scan in missing:
            refs[str(scan)] = np.asanyarray(run_scan(scan, spec, pred, SegmentOptions()).result.labels.dataobj)
        source += " + faithful PyTorch pipeline" if refs else ""
    return refs, source


def evaluate(cfg: RunConfig, spec: ModelSpec, onnx: Path | None, scans: list[Path], refs: dict, runs: int = 1, *,
             factor: str) -> SweepRow:
    """Time one configuration (a RunConfig varying ``factor``) on the sweep scans (1 warm-up, then the median of
    ``runs`` timed runs per scan) and measure its voxel agreement with the reference: a common.runs.sweep.SweepRow."""
    import numpy as np

    from common.inference.predictor_factory import build_predictor
    from common.records.metrics import voxel_agreement
    from common.runs.scan_run import run_scan

    row = SweepRow(config=cfg, factor=factor, scans=[str(s) for s in scans], runs=runs)
    try:
        pred = build_predictor(cfg, spec, onnx)
        run_scan(scans[0], spec, pred, cfg.segment)  # warm-up: session init, caches
        for scan in scans:
            rs = [run_scan(scan, spec, pred, cfg.segment) for _ in range(runs)]
            r = sorted(rs, key=lambda x: x.total_s)[len(rs) // 2]
            row.seconds.append(r.total_s)
            row.stages.append(r.stages)
            row.agreement.append(voxel_agreement(np.asanyarray(r.result.labels.dataobj), refs[str(scan)]))
    except Exception as exc:  # a configuration that cannot run is recorded, not fatal
        row.error = f"{type(exc).__name__}: {exc}"
    return row


def run_sweep(spec: ModelSpec, onnx: Path | None, scans: list[Path], refs: dict, threshold: float,
              finalist_runs: int, allow_approximate: bool = False) -> tuple[list[SweepRow], list[SweepRow]]:
    """One factor at a time from the baseline, then the best factors combined (one timed run each), then the
    three fastest faithful rows and the baseline re-timed (median of ``finalist_runs``): (rows, re-timed).
    Approximate candidates (bf16) are swept, combined and re-timed only with ``allow_approximate``."""
    from tqdm import tqdm

    rows: list[SweepRow] = []
    candidates = one_factor_configs(allow_approximate=allow_approximate)
    for cand in tqdm(candidates, desc="05 sweep", unit="config"):
        row = evaluate(cand.config, spec, onnx, scans, refs, factor=cand.factor)
        rows.append(row)
        agree = min(row.agreement) if row.agreement else float("nan")
        tqdm.write(f"{row.name:34s} {sum(row.seconds):7.2f} s  min agreement {agree:.5f}"
                   + (f"  ERROR {row.error}" if row.error else ""))
    best_per_factor = {}
    for factor in {r.factor for r in rows}:
        pick = select_fastest([r for r in rows if r.factor in (factor, "baseline")], threshold, allow_approximate)
        if pick is not None and pick.factor == factor:
            best_per_factor[factor] = pick.config
    combo = combine(best_per_factor)
    row = evaluate(combo, spec, onnx, scans, refs, factor="combined")
    rows.append(row)
    tqdm.write(f"{combo.name:34s} {sum(row.seconds):7.2f} s  min agreement "
               f"{min(row.agreement) if row.agreement else float('nan'):.5f}")
    # one run per configuration is noisy: re-time the fastest faithful candidates and the baseline
    faithful = sorted((r for r in rows if qualifies(r, threshold, allow_approximate)), key=lambda r: sum(r.seconds))
    finalists = faithful[:3] + [r for r in rows[:1] if r not in faithful[:3]]
    retimed = []
    for r in tqdm(finalists, desc="05 re-time finalists", unit="config"):
        rt = evaluate(r.config, spec, onnx, scans, refs, runs=finalist_runs, factor=r.factor)
        retimed.append(rt)
        tqdm.write(f"{rt.name:34s} {sum(rt.seconds):7.2f} s (median of {finalist_runs})")
    return rows, retimed
