#!/usr/bin/env python
"""Stage 06: segment every scan with the optimized configuration and write one anatomical passport each.

Input: ct_data/ (or --input DIR|FILE); with an empty ct_data/ the embedded synthetic CT phantom is used.
Per scan, written atomically into --out: <scan>_seg.nii.gz (labels in the scan's own grid) and
<scan>_passport.json (per-structure centroid, covariance, principal axes, boundary points in world mm).
The run configuration comes from 05's benchmarks/optimized_config.json when present (else the built-in
fastest exact configuration: ONNX Runtime, graph optimisation disabled, memory pattern off). One
predictor (ONNX Runtime session or PyTorch network) is created once and reused for all scans. Each scan record holds its tile count and the peak RSS of the work on it (common.peak_memory:
this process's peak from loading the scan to its last output written).
Resume: <scan>_run.json, written last, records the sha256 of the input's content, the sha256 of the
weights and the configuration (run config without its name, passport resolution/points); a scan is skipped
only when all three match and its outputs exist, else recomputed with one line saying what changed
(--force recomputes everything). A scan that fails is recorded with its error and the batch goes on.
Inputs: a folder is searched recursively (common.discovery); every entry found is segmented, or listed in
the result's "ignored" (label maps, documentation) or recorded as failed; scan ids, the stems of the output
files, come from the path relative to the input and are unique (collisions are renamed or refused, in one
line). The result JSON is written after every scan ("complete": false until the batch ends): Ctrl-C or
SIGTERM leave a valid record of what finished (exit 130 / 143). Two runs on one --out share the work: a scan
being segmented by another run (a lock in <out>/.locks/) is skipped and said so.
Exit code: 0 when every scan was segmented or up to date, 1 if any failed, 2 on bad options or nothing to do.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.args import positive_int, run_script, script_parser  # noqa: E402
from common.cli import (  # noqa: E402
    OPTIMIZED_CONFIG,
    add_run_arguments,
    ensure_onnx,
    fail,
    model_record,
    start_run,
)
from common.errors import InputError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__)
    add_run_arguments(p, "06_inference", timing=False, out_help="folder for masks and passports")
    p.add_argument("--config", type=Path, default=None,
                   help="run configuration JSON (default: benchmarks/optimized_config.json written by 05, "
                        "else the built-in fastest exact configuration, common.runner.RunConfig.fastest_exact)")
    p.add_argument("--passport-resolution", choices=["model", "original"], default="model",
                   help="compute passports on the model-resolution (3 mm) label map (fast, default) or on "
                        "the label map in the scan's own grid")
    p.add_argument("--max-points", type=positive_int, default=500, help="boundary points per structure (default 500)")
    p.add_argument("--no-passport", action="store_true", help="segment only")
    p.add_argument("--passport-repeats", type=positive_int, default=1,
                   help="for benchmarking: time the passport computation this many times per scan and record "
                        "median/min/max in the result (default 1: the single timed run of the batch)")
    p.add_argument("--force", action="store_true", help="recompute scans whose outputs already exist")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _outputs(out_dir: Path, scan_id: str) -> tuple[Path, Path]:
    from common.runner import mask_path_for

    return mask_path_for(out_dir, scan_id), out_dir / f"{scan_id}_passport.json"


def _time_passport(lab_img, names: dict, max_points: int, repeats: int) -> dict:
    """Median/min/max milliseconds of compute_structures on one label map over ``repeats`` runs."""
    import numpy as np

    from common.passport import compute_structures

    labels = np.asanyarray(lab_img.dataobj)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compute_structures(labels, lab_img.affine, names, max_points=max_points)
        times.append((time.perf_counter() - t0) * 1000)
    return {"median": float(np.median(times)), "min": min(times), "max": max(times), "n": repeats,
            "grid_shape": list(labels.shape), "labels": int(len(np.unique(labels)) - 1)}


def _segment_one(scan: Path, scan_id: str, args, spec, predictor, cfg, key_config: dict) -> dict | None:
    """Segment one scan and write its outputs (mask, passport, run record last); return its scan record, or
    None when it is up to date (resume) — the caller records the skip."""
    import numpy as np
    from tqdm import tqdm

    from common import resume
    from common.official_output import official_header
    from common.passport import build_passport, save_passport, scan_metadata
    from common.peak_memory import track_peak_rss
    from common.results import add_repeat, finalize_scan, mark_failed, new_scan_record
    from common.runner import labels_present, run_scan
    from common.volume import save_labels

    mask_path, passport_path = _outputs(args.out, scan_id)
    run_path = resume.sidecar_path(args.out, scan_id)
    outputs = [mask_path] if args.no_passport else [mask_path, passport_path]
    try:  # hashed before loading: a file changed meanwhile leaves a key that no longer matches
        key = resume.run_key(resume.input_digest(scan), spec.checkpoint_sha256, key_config)
    except OSError:
        key = None  # unreadable input: the scan fails below with its own error
    if not any(p.exists() for p in (mask_path, passport_path, run_path)):
        reasons = []  # first run for this scan
    elif args.force:
        reasons = ["--force"]
    elif key is None:
        reasons = ["input could not be hashed"]
    else:
        reasons = resume.recompute_reasons(run_path, key, outputs)
        if not reasons:
            return None
        tqdm.write(f"recomputing {scan_id}: {'; '.join(reasons)}")
    record = new_scan_record(scan, shape=[0, 0, 0], spacing_mm=[0, 0, 0], orientation="?", scan_id=scan_id)
    if reasons:
        record["recomputed_because"] = reasons
    try:
        with track_peak_rss() as peak:  # the whole work on this scan: load .. outputs written
            run_path.unlink(missing_ok=True)  # outputs rewritten below must never pair with an old record
            run = run_scan(scan, spec, predictor, cfg.segment, mask_path=None)
            vol = run.volume
            record.update(shape=list(vol.shape[:3]), spacing_mm=list(vol.spacing[:3]), orientation=vol.orientation)
            stages = dict(run.stages)
            t0 = time.perf_counter()
            passport = lab_img = None
            # a file's run-key digest is its sha256 (a folder's also covers file names: hashed again)
            file_digest = key["input_sha256"] if key is not None and scan.is_file() else None
            if not args.no_passport:
                lab_img = run.result.labels_model_res if args.passport_resolution == "model" else run.result.labels
                passport = build_passport(np.asanyarray(lab_img.dataobj), lab_img.affine, spec.labels,
                                          scan=scan_metadata(scan, vol.image, sha256=file_digest),
                                          model=spec.provenance(), resolution=args.passport_resolution,
                                          max_points=args.max_points)
            stages["passport"] = time.perf_counter() - t0
            if passport is not None and args.passport_repeats > 1:
                record["passport_timing_ms"] = _time_passport(lab_img, spec.labels, args.max_points,
                                                              args.passport_repeats)
            t0 = time.perf_counter()
            labels = np.asanyarray(run.result.labels.dataobj)
            save_labels(labels, vol.affine, mask_path, header=official_header(vol.image))  # as the official tool
            if passport is not None:
                save_passport(passport, passport_path)
            if key is not None:  # last: only a scan whose outputs are all written looks complete
                resume.write_key(run_path, key, scan=str(scan), mask=mask_path.name,
                                 passport=passport_path.name if passport is not None else None)
            stages["save"] = stages.get("save", 0.0) + time.perf_counter() - t0
        add_repeat(record, sum(stages.values()), stages, peak_rss_bytes=peak.peak_bytes,
                   peak_rss_method=peak.method)
        record["n_tiles"] = run.result.n_tiles
        record["labels_present"] = labels_present(labels)
        record["mask"] = str(mask_path)
        record["passport"] = str(passport_path) if passport is not None else None
        record["warnings"] = run.warnings
        for w in run.warnings:
            tqdm.write(f"warning: {scan_id}: {w}")
    except InputError as exc:
        mark_failed(record, exc)
    except Exception as exc:  # record and go on: one bad scan must not stop the batch
        mark_failed(record, f"{scan}: {type(exc).__name__}: {exc}")
    return finalize_scan(record)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from common import resume
    from common.locks import ScanLock
    from common.results import BatchRecorder, new_result
    from common.runner import RunConfig, build_predictor, load_config

    try:
        cfg_path = args.config or (OPTIMIZED_CONFIG if OPTIMIZED_CONFIG.exists() else None)
        cfg = load_config(cfg_path) if cfg_path else RunConfig.fastest_exact()  # bad config: before any work
        batch, spec = start_run(args)
        onnx = ensure_onnx(spec, args.onnx) if cfg.backend == "onnxruntime" else None
        predictor = build_predictor(cfg, spec, onnx)
    except (InputError, OSError, RuntimeError) as exc:
        return fail(exc)
    print(f"data: {batch.source}; configuration: {cfg.name} ({cfg_path or 'built-in defaults'}), backend {cfg.backend}")
    for item in batch.ignored:
        print(f"ignored {item['file']}: {item['reason']}")

    settings = {"config": cfg.to_dict(), "config_file": str(cfg_path) if cfg_path else None,
                "passport_resolution": args.passport_resolution, "max_points": args.max_points,
                "input": batch.source, "out": str(args.out)}
    key_config = resume.config_key(cfg.to_dict(), passport_resolution=args.passport_resolution,
                                   max_points=args.max_points, no_passport=args.no_passport)
    result = new_result("06_inferenceAndPassport.py", method="inference_passport", settings=settings,
                        model=model_record(spec))
    result["skipped"] = []
    recorder = BatchRecorder(result, args.result, batch)
    for ref in batch.refused:
        tqdm.write(f"FAILED {ref['error']}")
    bar = tqdm(batch.scans, desc="06 segment+passport", unit="scan")
    try:
        for scan in bar:
            scan_id = batch.ids[scan]
            bar.set_postfix_str(scan_id)
            with ScanLock(args.out, scan_id) as lock:
                if not lock.acquired:
                    result["skipped"].append({"file": str(scan), "scan_id": scan_id,
                                              "reason": f"being segmented by another run ({lock.holder})"})
                    tqdm.write(f"skipped {scan_id}: being segmented by another run ({lock.holder})")
                    recorder.write()
                    continue
                record = _segment_one(scan, scan_id, args, spec, predictor, cfg, key_config)
            if record is None:
                result["skipped"].append({"file": str(scan), "scan_id": scan_id,
                                          "reason": "up to date: same input content, weights and configuration "
                                                    "(--force recomputes)"})
                recorder.write()
                continue
            if record["status"] == "failed":
                tqdm.write(f"FAILED {record['error']}")
            recorder.add(record)
    except (KeyboardInterrupt, SystemExit) as exc:
        bar.close()
        return recorder.interrupt(exc)
    ok = [s for s in result["scans"] if s["status"] == "ok"]
    if ok:
        tot = sum(s["median"]["total_s"] for s in ok)
        pp = sum(s["median"]["stages"].get("passport", 0.0) for s in ok)
        recorder.summary_extra["passport_share_of_total"] = pp / tot if tot else None
    try:
        recorder.finish()
    except OSError as exc:
        return fail(exc, 1)
    for s in ok:
        st = s["median"]["stages"]
        rss = s.get("peak_rss_bytes")
        print(f"{s['scan_id']}: {s['median']['total_s']:.2f} s total — " +
              ", ".join(f"{k} {v:.2f}" for k, v in st.items()) + f"; {len(s['labels_present'])} structures"
              + (f"; {s['n_tiles']} tiles" if s.get("n_tiles") else "")
              + (f"; peak RSS {rss / 2**30:.2f} GiB" if rss else ""))
    print(f"{len(ok)} done, {len(result['skipped'])} skipped, {recorder.n_failed} failed, "
          f"{len(batch.ignored)} ignored; weights: {spec.provenance()['weights']}; result: {args.result}")
    return 1 if recorder.n_failed else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
