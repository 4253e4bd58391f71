#!/usr/bin/env python
"""Stage 06: segment every scan with the optimized configuration and write one anatomical passport each.

Input: ct_data/ (or --input DIR|FILE); with an empty ct_data/ the embedded synthetic CT phantom is used.
Per scan, written atomically into --out: <scan>_seg.nii.gz (labels in the scan's own grid) and
<scan>_passport.json (per-structure centroid, covariance, principal axes, boundary points in world mm).
The run configuration comes from 05's benchmarks/optimized_config.json when present (else the built-in
fastest exact configuration: nnU-Net's PyTorch network run channels-last on oneDNN (torch's threads), freed
memory kept; common.inference.run_config.RunConfig.fastest_exact). One predictor (PyTorch network or ONNX Runtime
session) is created once and reused for all scans. Each scan record holds its tile count and the peak RSS
of the work on it (common.core.peak_memory: this process's peak from loading the scan to its last output written).
Resume: <scan>_run.json, written last, records the sha256 of the input's content, the sha256 of the
weights and the configuration (run config without its name, passport resolution/points); a scan is skipped
only when all three match and its outputs exist, else recomputed with one line saying what changed
(--force recomputes everything). A scan that fails is recorded with its error and the batch goes on.
Inputs: a folder is searched recursively (common.imaging.discovery); every entry found is segmented, or listed in
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

from common.cli.args import fail, nonnegative_int, positive_int, run_script, script_parser
from common.cli.cluster_args import add_cluster_arguments
from common.cli.script_args import add_run_arguments, report_efficiency, start_onnx_run
from common.core.errors import InputError
from common.core.paths import OPTIMIZED_CONFIG
from common.inference.model_cache import model_record
from common.inference.precision import PRECISION_HELP, PRECISIONS, label
from common.runs.efficiency import EFFICIENCY_HELP, add_scan_efficiencies


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__)
    add_run_arguments(p, "06_inference", timing=False, out_help="folder for masks and passports")
    p.add_argument("--config", type=Path, default=None,
                   help="run configuration JSON (default: benchmarks/optimized_config.json written by 05, "
                        "else the built-in fastest exact configuration, common.inference.run_config.RunConfig.fastest_exact)")
    p.add_argument("--passport-resolution", choices=["model", "original"], default="model",
                   help="compute passports on the model-resolution (3 mm) label map (fast, default) or on "
                        "the label map in the scan's own grid")
    p.add_argument("--max-points", type=positive_int, default=500, help="boundary points per structure (default 500)")
    p.add_argument("--no-passport", action="store_true", help="segment only")
    p.add_argument("--passport-repeats", type=positive_int, default=1,
                   help="for benchmarking: time the passport computation this many times per scan and record "
                        "median/min/max in the result (default 1: the single timed run of the batch)")
    p.add_argument("--force", action="store_true", help="recompute scans whose outputs already exist")
    p.add_argument("--efficiency", action="store_true", help=EFFICIENCY_HELP)
    p.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    p.add_argument("--margin-tiles", type=nonnegative_int, default=1, metavar="N",
                   help="with an approximate --precision: after the batch, compare its logits with exact float32 "
                        "on N central tiles of the first scan (largest logit error, share of voxels whose top-2 "
                        "margin is below it; the result's \"approximation\"); 0 skips it (default 1)")
    add_cluster_arguments(p)
    return p


def _job_options(args, key_config: dict):
    from common.runs.scan_job import JobOptions

    return JobOptions(out=args.out, no_passport=args.no_passport, force=args.force,
                      passport_resolution=args.passport_resolution, max_points=args.max_points,
                      passport_repeats=args.passport_repeats, key_config=key_config)


def _take(outcome, scan: Path, scan_id: str, result: dict, recorder, say) -> None:
    """Record one scan's JobOutcome (skipped or a scan record) and print its messages."""
    for line in outcome.messages:
        say(line)
    if outcome.record is None:
        result["skipped"].append({"file": str(scan), "scan_id": scan_id, "reason": outcome.skipped})
        recorder.write()
    else:
        recorder.add(outcome.record)


def _run_here(batch, opts, spec, predictor, cfg, result, recorder) -> None:
    """The single-process batch: one predictor, scans in order."""
    from tqdm import tqdm

    from common.runs.scan_job import segment_and_passport

    bar = tqdm(batch.scans, desc="06 segment+passport", unit="scan")
    try:
        for scan in bar:
            scan_id = batch.ids[scan]
            bar.set_postfix_str(scan_id)
            outcome = segment_and_passport(scan, scan_id, opts, spec, predictor, cfg)
            _take(outcome, scan, scan_id, result, recorder, tqdm.write)
    finally:
        bar.close()


def _run_on_cluster(args, batch, opts, cfg, onnx, result, recorder) -> None:
    """The batch as Dask tasks (common.runs.cluster): each worker builds its predictor once; the client records."""
    from tqdm import tqdm

    from common.cli.cluster_args import cluster_target
    from common.records.results import finalize_scan, mark_failed, new_scan_record
    from common.runs.cluster import ModelRecipe, open_client, run_tasks
    from common.runs.scan_job import JobOutcome, segment_and_passport

    recipe = ModelRecipe(cfg, args.weights, str(onnx) if onnx else None)
    with open_client(cluster_target(args), recipe, log=print) as run:
        result["machine"]["cluster"] = run.record()
        items = [(scan, batch.ids[scan], (opts,)) for scan in batch.scans]
        try:
            for task in run_tasks(run, segment_and_passport, items, scan_timeout_s=args.scan_timeout,
                                  desc="06 segment+passport (cluster)"):
                outcome = task.value
                if task.error is not None:
                    record = new_scan_record(task.scan, shape=[0, 0, 0], spacing_mm=[0, 0, 0], orientation="?",
                                             scan_id=task.scan_id)
                    outcome = JobOutcome(record=finalize_scan(mark_failed(record, task.error)),
                                         messages=[f"FAILED {task.error}"])
                died = outcome.record.get("interrupted_attempt") if outcome.record is not None else None
                if outcome.record is not None and (len(task.attempts) > 1 or died):
                    # a start event of the dead worker can be lost with it; its lock's .pid file cannot
                    outcome.record["attempts"] = max(len(task.attempts), 2)
                    outcome.record["retried_because"] = (
                        "its Dask worker died while segmenting it ("
                        + ", ".join([*(["workers: " + ", ".join(task.attempts)] if task.attempts else []),
                                     *([f"the lock's earlier holder: {died}"] if died else [])]) + ")")
                    outcome.messages.append(f"note: {task.scan_id} was retried: "
                                            f"{outcome.record['retried_because']}")
                _take(outcome, task.scan, task.scan_id, result, recorder, tqdm.write)
                result["machine"]["cluster"] = run.record()
        finally:
            result["machine"]["cluster"] = run.record()


def _margins(args, cfg, spec, predictor, result: dict, recorder) -> None:
    """With an approximate precision: the margin analysis (common.runs.approximation) on the first scan segmented
    here, after the batch, into result["approximation"]; a failure is recorded, not fatal."""
    if not cfg.approximate or args.margin_tiles == 0 or predictor is None:
        return
    from common.runs.approximation import margin_line, measure_margins

    first = next((s for s in result["scans"] if s["status"] == "ok"), None)
    if first is None:
        return
    try:
        result["approximation"] = measure_margins(Path(first["file"]), spec, cfg, predictor, args.margin_tiles)
        print(margin_line(result["approximation"]))
    except (InputError, OSError, RuntimeError, ValueError) as exc:
        result["approximation"] = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    recorder.write()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from common.cli.cluster_args import cluster_problem, wants_cluster
    from common.core.machine import usable_cores
    from common.inference.precision import describe
    from common.inference.predictor_factory import build_predictor
    from common.inference.run_config import RunConfig, load_config
    from common.records import resume
    from common.records.results import BatchRecorder, new_result

    try:
        problem = cluster_problem(args)
        if problem:
            raise InputError(None, problem)
        cfg_path = args.config or (OPTIMIZED_CONFIG if OPTIMIZED_CONFIG.exists() else None)
        cfg = load_config(cfg_path) if cfg_path else RunConfig.fastest_exact()  # bad config: before any work
        cfg = cfg.with_precision(args.precision)
        # the ONNX file is the network for ONNX Runtime, and what --efficiency counts the tile's FLOPs from
        batch, spec, onnx = start_onnx_run(args, export=cfg.backend == "onnxruntime" or args.efficiency)
        predictor = None if wants_cluster(args) else build_predictor(cfg, spec, onnx)  # before any scan
    except (InputError, OSError, RuntimeError) as exc:
        return fail(exc)
    print(f"data: {batch.source}; configuration: {cfg.name} ({cfg_path or 'built-in defaults'}), backend {cfg.backend}"
          f"; {label(cfg.precision)}")
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
    result["arithmetic"] = describe(cfg.precision)
    recorder = BatchRecorder(result, args.result, batch)
    for ref in batch.refused:
        tqdm.write(f"FAILED {ref['error']}")
    opts = _job_options(args, key_config)
    if args.efficiency:
        report_efficiency(result, onnx, spec, cfg.threads, cfg.precision)
    t0 = time.perf_counter()
    try:
        if wants_cluster(args):
            _run_on_cluster(args, batch, opts, cfg, onnx, result, recorder)
        else:
            _run_here(batch, opts, spec, predictor, cfg, result, recorder)
    except (KeyboardInterrupt, SystemExit) as exc:
        return recorder.interrupt(exc)
    except RuntimeError as exc:  # the cluster could not be started or reached: one line, the record kept
        recorder.write()
        return fail(exc)
    wall = time.perf_counter() - t0
    _margins(args, cfg, spec, predictor, result, recorder)
    order = {str(p): i for i, p in enumerate(batch.scans)}  # batch order, whatever order tasks finished in
    result["scans"].sort(key=lambda s: order.get(s["file"], -1))
    ok = [s for s in result["scans"] if s["status"] == "ok"]
    add_scan_efficiencies(result)
    cores = result["machine"].get("cluster", {}).get("cores") or usable_cores()
    recorder.summary_extra["throughput"] = {
        "wall_s": wall, "scans_ok": len(ok), "cores": cores,
        "scans_per_hour": len(ok) / wall * 3600 if wall > 0 else None,
        "scans_per_core_hour": len(ok) / wall * 3600 / cores if wall > 0 else None}
    if ok:
        tot = sum(s["median"]["total_s"] for s in ok)
        pp = sum(s["median"]["stages"].get("passport", 0.0) for s in ok)
        recorder.summary_extra["passport_share_of_total"] = pp / tot if tot else None
    try:
        recorder.finish()
    except OSError as exc:
        return fail(exc, 1)
    tag = f" [{label(cfg.precision)}]" if cfg.approximate else ""
    for s in ok:
        st = s["median"]["stages"]
        rss = s.get("peak_rss_bytes")
        print(f"{s['scan_id']}{tag}: {s['median']['total_s']:.2f} s total — " +
              ", ".join(f"{k} {v:.2f}" for k, v in st.items()) + f"; {len(s['labels_present'])} structures"
              + (f"; {s['n_tiles']} tiles" if s.get("n_tiles") else "")
              + (f"; {s['inference_s_per_tile']:.2f} s per tile, efficiency {s['efficiency']:.0%}"
                 if s.get("efficiency") else "")
              + (f" ({s['efficiency_error']})" if s.get("efficiency_error") else "")
              + (f"; peak RSS {rss / 2**30:.2f} GiB" if rss else ""))
    tp = recorder.summary_extra["throughput"]
    print(f"{len(ok)} done, {len(result['skipped'])} skipped, {recorder.n_failed} failed, "
          f"{len(batch.ignored)} ignored in {wall:.1f} s"
          + (f" ({tp['scans_per_hour']:.0f} scans/h, {tp['scans_per_core_hour']:.1f} per core-hour on {cores} "
             "cores)" if ok else "")
          + f"; weights: {spec.provenance()['weights']}; result: {args.result}")
    return 1 if recorder.n_failed else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
