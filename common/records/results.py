"""The one versioned result schema that scripts 03-06 write and 07 reads ("ts-bench-result", version 1).

A result is a plain JSON object (dict), checked against typed models at the file boundary (common.records.result_schema):
strict on required keys and their types, tolerant of extra keys. Times are seconds; shapes are the scan's (x, y, z) voxel counts; spacing is mm.

    {"schema": "ts-bench-result", "schema_version": 1, "script": "05_...", "method": "optimized",
     "created": "2025-01-01T12:00:00Z", "machine": {...}, "versions": {...},
     "model": {"name": ..., "weights": "official" | "standin", "sha256": ...}, "settings": {...},
     "scans": [{"file", "scan_id", "shape", "spacing_mm", "orientation",
                "repeats": [{"total_s": 1.2, "stages": {"load": 0.1, ...}}, ...],
                "median": {"total_s", "stages", "min_total_s", "max_total_s", "iqr_total_s", "n"} | None,
                "labels_present": [1, 2, ...], "mask": "path/to/labels.nii.gz" | None,
                "status": "ok" | "failed", "error": None | "one line",
                "n_tiles": 8 | None, "peak_rss_bytes": 5.1e9 | None, "peak_rss_method": "vmhwm_reset" | None},
               ...],
     "summary": {...}}

Optional within version 1 (files written before they existed still load): "complete" (false while a batch
is running or after it was interrupted: written after every scan by BatchRecorder), "interrupted" (the
signal that ended it, e.g. "SIGINT"), "ignored" ([{"file", "reason"}]: inputs found that are not scans),
"notes" (one-line remarks such as renamed scan ids); a scan's "n_tiles" (sliding-window
tiles of 112x112x128 at 3 mm), "peak_rss_bytes" (peak resident memory in bytes of the work on the scan, the
maximum over its timed runs; a repeat may hold its own "peak_rss_bytes") and "peak_rss_method" (how it was
measured, see common.core.peak_memory: "vmhwm_reset", "ru_maxrss_lifetime" or, for the official tool,
"official_worker_ru_maxrss_self_plus_children").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.core.atomic import atomic_write_json
from common.core.errors import InputError
from common.core.machine import library_versions, machine_info
from common.core.text import one_line, utc_now
from common.imaging.scan_paths import scan_id as _scan_id
from common.records.metrics import latency_stats
from common.records.result_schema import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    STAGES,
    WEIGHTS,
    is_int,
    is_number,
    validate_result,
)

MAX_ERROR_CHARS = 500


# --------------------------------------------------------------------------------------------- build


def new_result(script: str, *, method: str, settings: dict, model: dict) -> dict:
    """A new, empty result for ``script`` (e.g. "05_tuned_pipeline.py").

    ``method``: "official_pytorch", "onnx_default", "optimized", "inference_passport", ...
    ``model`` must hold "name", "weights" ("official" or "standin") and "sha256" (hex digest of the weights
    file, or None); optional "labels" ({label id: structure name}) lets 07 name structures.
    Raises ValueError on a bad ``model``.
    """
    model = dict(model)
    for key in ("name", "weights", "sha256"):
        if key not in model:
            raise ValueError(f"model description lacks {key!r}")
    if model["weights"] not in WEIGHTS:
        raise ValueError(f"model weights must be one of {WEIGHTS}, got {model['weights']!r}")
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "script": str(script),
        "method": str(method),
        "created": utc_now(),
        "machine": machine_info(),
        "versions": library_versions(),
        "model": model,
        "settings": dict(settings),
        "scans": [],
        "summary": {},
    }


def new_scan_record(file: str | Path, *, shape, spacing_mm, orientation: str, scan_id: str | None = None) -> dict:
    """A scan record: ``shape`` (x, y, z) voxels, ``spacing_mm`` (x, y, z) mm, ``orientation`` axis codes ("RAS");
    ``scan_id`` is the batch's unique id for it (common.imaging.discovery; default: the file name without .nii.gz)."""
    return {
        "file": str(file),
        "scan_id": scan_id if scan_id is not None else _scan_id(file),
        "shape": [int(s) for s in shape],
        "spacing_mm": [float(s) for s in spacing_mm],
        "orientation": str(orientation),
        "repeats": [],
        "median": None,
        "labels_present": [],
        "mask": None,
        "status": "ok",
        "error": None,
        "n_tiles": None,
        "peak_rss_bytes": None,
        "peak_rss_method": None,
    }


def add_repeat(record: dict, total_s: float, stages: dict[str, float], *, peak_rss_bytes: int | None = None,
               peak_rss_method: str | None = None) -> dict:
    """Append one timed run: ``total_s`` wall seconds and per-stage seconds (names from STAGES), optionally
    the run's peak RSS in bytes and how it was measured (the scan's peak_rss_bytes becomes the maximum).

    Raises ValueError on an unknown stage name, a negative / non-finite time or a bad byte count.
    Returns ``record``.
    """
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage name(s) {unknown}; allowed: {list(STAGES)}")
    times = {"total_s": total_s, **stages}
    for name, value in times.items():
        if not is_number(value) or value < 0:
            raise ValueError(f"time {name!r} must be a finite number of seconds >= 0, got {value!r}")
    rep = {"total_s": float(total_s), "stages": {k: float(stages[k]) for k in STAGES if k in stages}}
    if peak_rss_bytes is not None:
        if not (is_int(peak_rss_bytes) or isinstance(peak_rss_bytes, np.integer)) or peak_rss_bytes < 0:
            raise ValueError(f"peak_rss_bytes must be an integer >= 0, got {peak_rss_bytes!r}")
        rep["peak_rss_bytes"] = int(peak_rss_bytes)
        record_peak_rss(record, int(peak_rss_bytes), peak_rss_method)
    record["repeats"].append(rep)
    return record


def record_peak_rss(record: dict, peak_rss_bytes: int | None, method: str | None) -> dict:
    """Raise the scan's ``peak_rss_bytes`` to ``peak_rss_bytes`` (max over calls) and note ``method``."""
    if peak_rss_bytes is None:
        return record
    old = record.get("peak_rss_bytes")
    record["peak_rss_bytes"] = int(peak_rss_bytes) if old is None else max(int(old), int(peak_rss_bytes))
    if method:
        record["peak_rss_method"] = str(method)
    return record


def finalize_scan(record: dict) -> dict:
    """Fill record["median"] from its repeats (None when there are none). Returns ``record``.

    median = {"total_s", "stages": {stage: median over repeats that timed it}, "min_total_s", "max_total_s",
    "iqr_total_s" (75th - 25th percentile), "n" (repeats)}. The scan's peak_rss_bytes becomes the maximum
    over the repeats that measured one (when any did).
    """
    reps = record.get("repeats") or []
    peaks = [r["peak_rss_bytes"] for r in reps if r.get("peak_rss_bytes") is not None]
    if peaks:
        record["peak_rss_bytes"] = max([*peaks, record.get("peak_rss_bytes") or 0])
    if not reps:
        record["median"] = None
        return record
    totals = np.asarray([r["total_s"] for r in reps], dtype=np.float64)
    stages = {}
    for name in STAGES:
        vals = [r["stages"][name] for r in reps if name in r.get("stages", {})]
        if vals:
            stages[name] = float(np.median(vals))
    q25, q75 = np.percentile(totals, [25, 75])
    record["median"] = {
        "total_s": float(np.median(totals)),
        "stages": stages,
        "min_total_s": float(totals.min()),
        "max_total_s": float(totals.max()),
        "iqr_total_s": float(q75 - q25),
        "n": int(totals.size),
    }
    return record


def mark_failed(record: dict, error: str | BaseException) -> dict:
    """Mark the scan failed with a one-line ``error`` (exceptions become "TypeName: message"). Returns ``record``."""
    if isinstance(error, InputError):  # already "<file>: <problem>"
        error = str(error)
    elif isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    record["status"] = "failed"
    record["error"] = one_line(error, MAX_ERROR_CHARS) or "failed"
    return record


def scan_voxels(record: dict) -> int:
    """Number of voxels of the scan (product of its shape)."""
    return int(np.prod(record["shape"], dtype=np.int64))


def summarize(result: dict) -> dict:
    """Compute result["summary"] (and return it).

    n_scans, n_ok, n_failed, success_rate (0..1, None without scans), latency_mean_s / latency_median_s /
    latency_p95_s (over the per-scan median totals of ok scans), total_voxels, total_median_s and
    throughput_mvox_s (sum of voxels / sum of median totals / 1e6, Mvoxel/s).
    """
    scans = result.get("scans", [])
    ok = [s for s in scans if s.get("status") == "ok"]
    timed = [s for s in ok if s.get("median")]
    totals = [s["median"]["total_s"] for s in timed]
    stats = latency_stats(totals)
    voxels = sum(scan_voxels(s) for s in timed)
    total_s = float(sum(totals))
    summary = {
        "n_scans": len(scans),
        "n_ok": len(ok),
        "n_failed": len(scans) - len(ok),
        "success_rate": (len(ok) / len(scans)) if scans else None,
        "latency_mean_s": stats["mean"],
        "latency_median_s": stats["median"],
        "latency_p95_s": stats["p95"],
        "total_voxels": int(voxels),
        "total_median_s": total_s,
        "throughput_mvox_s": (voxels / total_s / 1e6) if total_s > 0 else None,
    }
    result["summary"] = summary
    return summary


class BatchRecorder:
    """A batch's result, written atomically to ``path`` at the start and after every scan with
    ``"complete": false``, and with ``true`` at the end: an interrupted or killed batch leaves a valid record
    of the scans that finished. Inputs the batch refused (common.imaging.discovery) are recorded as failed scans."""

    def __init__(self, result: dict, path: str | Path, batch=None):
        self.result, self.path = result, Path(path)
        self.summary_extra: dict = {}  # kept in result["summary"] beside what summarize() computes
        result["complete"] = False
        if batch is not None:
            result["ignored"] = list(batch.ignored)
            result["notes"] = list(batch.notes)
            for ref in batch.refused:
                result["scans"].append(finalize_scan(mark_failed(new_scan_record(
                    ref["file"], shape=[0, 0, 0], spacing_mm=[0, 0, 0], orientation="?", scan_id=ref["scan_id"]),
                    ref["error"])))
        self.write()

    @property
    def n_failed(self) -> int:
        return sum(s["status"] == "failed" for s in self.result["scans"])

    def add(self, record: dict) -> None:
        """Append a finished scan record and write the result."""
        self.result["scans"].append(record)
        self.write()

    def write(self, *, strict: bool = False) -> Path | None:
        """Write the result now. A failing write (disk full, folder removed) is said in one line and retried
        after the next scan, so the batch goes on; with ``strict`` it raises OSError instead."""
        import sys

        summarize(self.result)
        self.result["summary"].update(self.summary_extra)
        try:
            path = write_result(self.result, self.path)
        except OSError as exc:
            if strict:
                raise OSError(f"{self.path}: the result could not be written ({exc.strerror or exc})") from exc
            print(f"warning: {self.path}: the result could not be written ({exc.strerror or exc}); "
                  "retrying after the next scan", file=sys.stderr)
            return None
        return path

    def finish(self) -> Path:
        """The batch is done: write it marked complete (OSError, one line, if that fails)."""
        self.result["complete"] = True
        self.result.pop("interrupted", None)
        return self.write(strict=True)

    def interrupt(self, exc: BaseException) -> int:
        """Record an interruption (KeyboardInterrupt, or the SystemExit of common.core.signals' SIGTERM handler) and
        return the exit code (130 for Ctrl-C, 128 + signal number otherwise); prints one line to stderr."""
        import signal
        import sys

        code = 130 if isinstance(exc, KeyboardInterrupt) else (exc.code if isinstance(exc, SystemExit)
                                                                 and isinstance(exc.code, int) else 1)
        try:
            name = signal.Signals(code - 128).name if code > 128 else f"exit {code}"
        except ValueError:
            name = f"exit {code}"
        self.result["interrupted"] = name
        n_ok = sum(s["status"] == "ok" for s in self.result["scans"])
        try:
            self.write(strict=True)
            where = f"partial result (complete: false) in {self.path}"
        except Exception as err:  # noqa: BLE001 - the interruption is what must be reported
            where = f"the partial result could not be written ({err})"
        print(" ".join(f"interrupted ({name}) after {n_ok} scan(s) done; {where}".split()), file=sys.stderr)
        return code


def write_result(result: dict, path: str | Path) -> Path:
    """Validate ``result`` and write it as JSON to ``path`` atomically. Returns the path.

    Call summarize() first if the summary should be current. Raises InputError (naming ``path``) when invalid.
    """
    validate_result(result, path)
    return atomic_write_json(path, result)


def read_result(path: str | Path) -> dict:
    """Read and validate a result file. Raises InputError (one line, '<path>: <problem>') when the file is missing,
    not JSON, another schema or schema version, or lacks / mistypes a required field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "result file not found" if not path.exists() else "not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"unreadable result file ({type(exc).__name__}: {exc})") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    return validate_result(obj, path)
