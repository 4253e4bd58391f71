"""The benchmark loop shared by 03, 04 and 05: warm-up (not counted), N timed repeats, one record per scan.

Each timed run's peak RSS is measured here (common.core.peak_memory.track_peak_rss: this process's peak while
the run lasted) unless the run reports its own (03: the official tool's isolated worker); the scan record
keeps the maximum over its timed runs and the tile count a run reports.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tqdm as _tqdm
from tqdm import tqdm

from common.core.errors import InputError
from common.core.peak_memory import track_peak_rss
from common.imaging.discovery import Batch
from common.imaging.validation import load_scan
from common.records.results import BatchRecorder, add_repeat, finalize_scan, mark_failed, new_scan_record
from common.runs.efficiency import add_scan_efficiencies

_tqdm.tqdm.monitor_interval = 0  # no monitor thread: the official tool forks (see common/runs/official.py)

# run(scan path, mask path or None) -> (total seconds, stage seconds, labels array or None[, extra]);
# the optional extra dict may hold "n_tiles" (int), and "peak_rss_bytes" (int) with "peak_rss_method" (str)
# when the run measured its peak memory itself (e.g. in another process).
RunFn = Callable[[Path, Path | None], tuple]


def _unpack(out: tuple) -> tuple[float, dict[str, float], Any, dict[str, Any]]:
    total, stages, labels, *rest = out
    return total, stages, labels, (dict(rest[0] or {}) if rest else {})


def benchmark_scan(scan: Path, run: RunFn, mask_path: Path, repeats: int, warmup: int = 1,
                   scan_id: str | None = None) -> dict:
    """Validate ``scan``, run it ``warmup`` times untimed, then ``repeats`` timed runs, each writing the mask.

    Returns a scan record of the shared result schema (status 'failed' with a one-line error on failure).
    """
    from common.runs.scan_run import labels_present

    record = new_scan_record(scan, shape=[0, 0, 0], spacing_mm=[0, 0, 0], orientation="?", scan_id=scan_id)
    try:
        vol, warnings = load_scan(scan)  # bad input is reported before any timing
        record.update(shape=list(vol.shape[:3]), spacing_mm=list(vol.spacing[:3]), orientation=vol.orientation,
                      warnings=warnings)
        del vol
        for _ in range(warmup):
            run(scan, mask_path)
        labels = None
        for _ in range(repeats):  # every timed run writes its mask: saving is part of the job
            out = labels = None  # the previous run's mask is not part of this run's memory
            with track_peak_rss() as peak:
                out = run(scan, mask_path)
            total, stages, labels, extra = _unpack(out)
            if extra.get("peak_rss_bytes") is not None:
                rss, method = int(extra["peak_rss_bytes"]), extra.get("peak_rss_method")
            else:
                rss, method = peak.peak_bytes, peak.method
            add_repeat(record, total, stages, peak_rss_bytes=rss, peak_rss_method=method)
            if extra.get("n_tiles") is not None:
                record["n_tiles"] = int(extra["n_tiles"])
        record["mask"] = str(mask_path)
        if labels is not None:
            record["labels_present"] = labels_present(labels)
    except InputError as exc:
        mark_failed(record, exc)
    except Exception as exc:  # one bad scan must not stop the batch
        mark_failed(record, f"{scan}: {type(exc).__name__}: {exc}")
    return finalize_scan(record)


def benchmark_scans(batch: Batch, run: RunFn, out_dir: Path, repeats: int, warmup: int = 1,
                    desc: str = "benchmark", recorder: BatchRecorder | None = None) -> list[dict]:
    """Benchmark every scan of ``batch`` (masks named by its unique ids in ``out_dir``); each finished record
    goes to ``recorder`` (written at once) when given. Returns the records."""
    from common.runs.scan_run import mask_path_for

    records = []
    bar = tqdm(batch.scans, desc=desc, unit="scan")
    for scan in bar:
        bar.set_postfix_str(scan.name)
        sid = batch.ids[scan]
        rec = benchmark_scan(scan, run, mask_path_for(out_dir, sid), repeats, warmup, scan_id=sid)
        if rec["status"] == "failed":
            tqdm.write(f"FAILED {rec['error']}")
        else:
            m = rec["median"]
            rss = rec.get("peak_rss_bytes")
            tqdm.write(f"{scan.name}: median {m['total_s']:.2f} s [{m['min_total_s']:.2f}–{m['max_total_s']:.2f}] "
                       f"over {m['n']} runs" + (f", peak RSS {rss / 2**30:.2f} GiB" if rss else "")
                       + (f", {rec['n_tiles']} tiles" if rec.get("n_tiles") else ""))
        records.append(rec)
        if recorder is not None:
            recorder.add(rec)
    return records


def run_benchmark_batch(result: dict, batch: Batch, run: RunFn, args, desc: str) -> int:
    """The batch of 03/04/05: every scan of ``batch`` benchmarked (``args``: out, result, repeats, warmup), the
    result written after each scan (common.records.results.BatchRecorder) and marked complete at the end. Returns the
    exit code: 0 all ok, 1 some failed, 130/143 interrupted by Ctrl-C/SIGTERM (the partial record is kept)."""
    recorder = BatchRecorder(result, args.result, batch)
    try:
        benchmark_scans(batch, run, args.out, args.repeats, args.warmup, desc=desc, recorder=recorder)
    except (KeyboardInterrupt, SystemExit) as exc:
        return recorder.interrupt(exc)
    add_scan_efficiencies(result)  # when the script measured the compute limit (--efficiency)
    try:
        recorder.finish()
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"result: {args.result} (weights: {result['model']['weights']})")
    return 1 if recorder.n_failed else 0


def segment_runner(spec, predictor, options) -> RunFn:
    """RunFn for our pipeline: load + validate, segment, save (stage-timed by common.runs.scan_run.run_scan)."""
    import numpy as np

    from common.runs.scan_run import run_scan

    def run(scan: Path, mask_path: Path | None):
        r = run_scan(scan, spec, predictor, options, mask_path=mask_path)
        return r.total_s, r.stages, np.asanyarray(r.result.labels.dataobj), {"n_tiles": r.result.n_tiles}

    return run
