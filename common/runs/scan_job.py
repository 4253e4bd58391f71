"""06's work on one scan, as one function that runs in-process or as a task on a Dask worker (common.runs.cluster).

``segment_and_passport`` resumes or recomputes the scan, writes its outputs atomically (mask, passport, run
record last) under a per-scan lock, and returns a ``JobOutcome``: the scan record (results schema), or the
reason it was skipped, plus the lines to print. It prints nothing itself, so that on a cluster the client
prints them, in order, above its progress bar.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class JobOptions:
    """06's options that shape the work on one scan (picklable, sent to cluster workers).

    ``out``: folder for ``<id>_seg.nii.gz``, ``<id>_passport.json`` and ``<id>_run.json``;
    ``passport_resolution``: "model" (3 mm label map) or "original" (the scan's grid); ``max_points``: boundary
    points per structure; ``passport_repeats``: timed passport runs per scan (benchmarking); ``key_config``:
    the configuration part of the resume key (common.records.resume.config_key)."""

    out: Path
    no_passport: bool
    force: bool
    passport_resolution: str
    max_points: int
    passport_repeats: int
    key_config: dict = field(default_factory=dict)


@dataclass
class JobOutcome:
    """``record``: the scan record (None when skipped); ``skipped``: why it was not recomputed; ``messages``:
    one-line messages for the user, in order."""

    record: dict | None = None
    skipped: str | None = None
    messages: list[str] = field(default_factory=list)


UP_TO_DATE = "up to date: same input content, weights and configuration (--force recomputes)"


def outputs_for(out_dir: Path, scan_id: str) -> tuple[Path, Path]:
    """(mask path, passport path) of ``scan_id`` in ``out_dir``."""
    from common.inference.run_config import mask_path_for

    return mask_path_for(out_dir, scan_id), out_dir / f"{scan_id}_passport.json"


def time_passport(lab_img, names: dict, max_points: int, repeats: int) -> dict:
    """Median/min/max milliseconds of compute_structures on one label map over ``repeats`` runs."""
    import numpy as np

    from common.records.passport import compute_structures

    labels = np.asanyarray(lab_img.dataobj)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compute_structures(labels, lab_img.affine, names, max_points=max_points)
        times.append((time.perf_counter() - t0) * 1000)
    return {"median": float(np.median(times)), "min": min(times), "max": max(times), "n": repeats,
            "grid_shape": list(labels.shape), "labels": int(len(np.unique(labels)) - 1)}


def segment_and_passport(scan: Path, scan_id: str, opts: JobOptions, spec, predictor, cfg) -> JobOutcome:
    """Segment ``scan`` under the per-scan lock in ``opts.out`` and write its outputs; a scan being segmented by
    another process (another run, or a worker that still holds it) is skipped with the reason."""
    from common.core.locks import ScanLock

    with ScanLock(opts.out, scan_id) as lock:
        if not lock.acquired:
            reason = f"being segmented by another run ({lock.holder})"
            return JobOutcome(skipped=reason, messages=[f"skipped {scan_id}: {reason}"])
        outcome = _segment_locked(scan, scan_id, opts, spec, predictor, cfg)
        if lock.died_holder is not None and outcome.record is not None:
            outcome.record["interrupted_attempt"] = lock.died_holder
            outcome.messages.insert(0, f"note: {scan_id}: an earlier attempt ({lock.died_holder}) died while "
                                       "segmenting it; segmented again")
        return outcome


def _segment_locked(scan: Path, scan_id: str, opts: JobOptions, spec, predictor, cfg) -> JobOutcome:
    import numpy as np

    from common.core.atomic import remove_stale_temp_files
    from common.core.errors import InputError
    from common.core.peak_memory import track_peak_rss
    from common.imaging.official_output import official_header
    from common.imaging.volume import save_labels
    from common.inference.run_config import labels_present, run_scan
    from common.records import resume
    from common.records.passport import build_passport, save_passport, scan_metadata
    from common.records.results import add_repeat, finalize_scan, mark_failed, new_scan_record

    outcome = JobOutcome()
    mask_path, passport_path = outputs_for(opts.out, scan_id)
    run_path = resume.sidecar_path(opts.out, scan_id)
    for target in (mask_path, passport_path, run_path):  # a process killed mid-write (we hold the lock now)
        for stale in remove_stale_temp_files(target):
            outcome.messages.append(f"removed {stale.name}: left by an interrupted write of {target.name}")
    outputs = [mask_path] if opts.no_passport else [mask_path, passport_path]
    try:  # hashed before loading: a file changed meanwhile leaves a key that no longer matches
        key = resume.run_key(resume.input_digest(scan), spec.checkpoint_sha256, opts.key_config)
    except OSError:
        key = None  # unreadable input: the scan fails below with its own error
    if not any(p.exists() for p in (mask_path, passport_path, run_path)):
        reasons = []  # first run for this scan
    elif opts.force:
        reasons = ["--force"]
    elif key is None:
        reasons = ["input could not be hashed"]
    else:
        reasons = resume.recompute_reasons(run_path, key, outputs)
        if not reasons:
            outcome.skipped = UP_TO_DATE
            return outcome
        outcome.messages.append(f"recomputing {scan_id}: {'; '.join(reasons)}")
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
            if not opts.no_passport:
                lab_img = run.result.labels_model_res if opts.passport_resolution == "model" else run.result.labels
                passport = build_passport(np.asanyarray(lab_img.dataobj), lab_img.affine, spec.labels,
                                          scan=scan_metadata(scan, vol.image, sha256=file_digest),
                                          model=spec.provenance(), resolution=opts.passport_resolution,
                                          max_points=opts.max_points)
            stages["passport"] = time.perf_counter() - t0
            if passport is not None and opts.passport_repeats > 1:
                record["passport_timing_ms"] = time_passport(lab_img, spec.labels, opts.max_points,
                                                             opts.passport_repeats)
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
        outcome.messages += [f"warning: {scan_id}: {w}" for w in run.warnings]
    except InputError as exc:
        mark_failed(record, exc)
    except Exception as exc:  # record and go on: one bad scan must not stop the batch
        mark_failed(record, f"{scan}: {type(exc).__name__}: {exc}")
    outcome.record = finalize_scan(record)
    if outcome.record["status"] == "failed":
        outcome.messages.append(f"FAILED {outcome.record['error']}")
    return outcome
