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
from typing import NamedTuple


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
    from common.runs.scan_run import mask_path_for

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

    problem = _name_problem(opts.out, scan_id)
    if problem:  # before the work (and before the lock file, whose name is as long)
        return _failed_outcome(scan, scan_id, problem)
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


def _name_problem(out_dir: Path, scan_id: str) -> str | None:
    """Why one of the scan's output names cannot be created in ``out_dir`` (one line), else None."""
    from common.core.atomic import name_too_long
    from common.core.locks import LOCK_DIR
    from common.records import resume

    mask, passport = outputs_for(out_dir, scan_id)
    for path in (mask, passport, resume.sidecar_path(out_dir, scan_id), out_dir / LOCK_DIR / f"{scan_id}.lock"):
        problem = name_too_long(path)
        if problem:
            return problem
    return None


def _failed_outcome(scan: Path, scan_id: str, error: str) -> JobOutcome:
    """The outcome of a scan refused before any work: its failed record and the FAILED line."""
    from common.records.results import finalize_scan, mark_failed, new_scan_record

    record = new_scan_record(scan, shape=[0, 0, 0], spacing_mm=[0, 0, 0], orientation="?", scan_id=scan_id)
    mark_failed(record, error)
    record = finalize_scan(record)
    return JobOutcome(record=record, messages=[f"FAILED {record['error']}"])


class _ScanFiles(NamedTuple):
    """One scan's outputs in ``opts.out``: label map, passport and run record (the resume key, written last)."""

    mask: Path
    passport: Path
    run: Path


def _segment_locked(scan: Path, scan_id: str, opts: JobOptions, spec, predictor, cfg) -> JobOutcome:
    """The work on one scan while its lock is held: leftovers of interrupted writes removed, the resume check,
    then segmentation, passport and outputs; a bad scan is recorded as failed, not raised."""
    from common.core.errors import InputError
    from common.records import resume
    from common.records.results import finalize_scan, mark_failed, new_scan_record

    outcome = JobOutcome()
    mask_path, passport_path = outputs_for(opts.out, scan_id)
    files = _ScanFiles(mask_path, passport_path, resume.sidecar_path(opts.out, scan_id))
    outcome.messages += _remove_interrupted_writes(files)
    key, reasons = _resume_check(scan, scan_id, opts, spec, files, outcome)
    if outcome.skipped is not None:
        return outcome
    record = new_scan_record(scan, shape=[0, 0, 0], spacing_mm=[0, 0, 0], orientation="?", scan_id=scan_id)
    if reasons:
        record["recomputed_because"] = reasons
    try:
        _segment_and_write(scan, scan_id, opts, spec, predictor, cfg, key, files, record, outcome)
    except InputError as exc:
        mark_failed(record, exc)
    except Exception as exc:  # record and go on: one bad scan must not stop the batch
        mark_failed(record, f"{scan}: {type(exc).__name__}: {exc}")
    outcome.record = finalize_scan(record)
    if outcome.record["status"] == "failed":
        outcome.messages.append(f"FAILED {outcome.record['error']}")
    return outcome


def _remove_interrupted_writes(files: _ScanFiles) -> list[str]:
    """Remove the temporary files a process killed mid-write left beside ``files`` (we hold the lock now);
    one message per file removed."""
    from common.core.atomic import remove_stale_temp_files
    from common.core.staging import remove_stale_staging

    messages = []
    for target in files:
        for stale in remove_stale_temp_files(target):
            messages.append(f"removed {stale.name}: left by an interrupted write of {target.name}")
    messages += remove_stale_staging(files.mask.parent / _staging_key(files))
    return messages


def _staging_key(files: _ScanFiles) -> str:
    """The name the scan's staging folder is made from (common.core.staging.StagedFiles): its run record's."""
    return files.run.name


def _resume_check(scan: Path, scan_id: str, opts: JobOptions, spec, files: _ScanFiles,
                  outcome: JobOutcome) -> tuple[dict | None, list[str]]:
    """(run key, reasons to recompute): the key is None when the input cannot be hashed; reasons are empty on a
    first run. Outputs up to date: ``outcome.skipped`` is set (reasons then empty); recomputed existing outputs:
    the reasons are added to ``outcome.messages``."""
    from common.records import resume

    outputs = [files.mask] if opts.no_passport else [files.mask, files.passport]
    try:  # hashed before loading: a file changed meanwhile leaves a key that no longer matches
        key = resume.run_key(resume.input_digest(scan), spec.checkpoint_sha256, opts.key_config)
    except OSError:
        key = None  # unreadable input: the scan fails below with its own error
    if not any(p.exists() for p in files):
        reasons = []  # first run for this scan
    elif opts.force:
        reasons = ["--force"]
    elif key is None:
        reasons = ["input could not be hashed"]
    else:
        reasons = resume.recompute_reasons(files.run, key, outputs)
        if not reasons:
            outcome.skipped = UP_TO_DATE
            return key, reasons
        outcome.messages.append(f"recomputing {scan_id}: {'; '.join(reasons)}")
    return key, reasons


def _segment_and_write(scan: Path, scan_id: str, opts: JobOptions, spec, predictor, cfg, key: dict | None,
                       files: _ScanFiles, record: dict, outcome: JobOutcome) -> None:
    """Segment ``scan``, build its passport, write the outputs and fill ``record`` (stage times in s, peak RSS
    in bytes); the run's warnings go to ``outcome.messages``. Raises what a bad scan raises."""
    from common.core.peak_memory import track_peak_rss
    from common.inference.precision import describe
    from common.records.results import add_repeat
    from common.runs.scan_run import labels_present, run_scan

    with track_peak_rss() as peak:  # the whole work on this scan: load .. outputs written
        run = run_scan(scan, spec, predictor, cfg.segment, mask_path=None,
                       preflight=lambda vol: _check_room(vol, opts.out))
        vol = run.volume
        record.update(shape=list(vol.shape[:3]), spacing_mm=list(vol.spacing[:3]), orientation=vol.orientation)
        stages = dict(run.stages)
        arithmetic = describe(cfg.precision)  # "approximate" in the record and the passport's provenance
        passport, lab_img = _build_passport(scan, opts, spec, run, key, stages, arithmetic)
        if passport is not None and opts.passport_repeats > 1:
            record["passport_timing_ms"] = time_passport(lab_img, spec.labels, opts.max_points,
                                                         opts.passport_repeats)
        labels = _write_outputs(scan, run, passport, key, files, stages)
    add_repeat(record, sum(stages.values()), stages, peak_rss_bytes=peak.peak_bytes,
               peak_rss_method=peak.method)
    record["n_tiles"] = run.result.n_tiles
    record["labels_present"] = labels_present(labels)
    record["mask"] = str(files.mask)
    record["passport"] = str(files.passport) if passport is not None else None
    record["warnings"] = run.warnings
    record["arithmetic"] = arithmetic
    outcome.messages += [f"warning: {scan_id}: {w}" for w in run.warnings]


def _build_passport(scan: Path, opts: JobOptions, spec, run, key: dict | None, stages: dict,
                    arithmetic: dict) -> tuple:
    """(passport, the label image it was computed from), both None with ``opts.no_passport``; its time (s) goes
    to ``stages["passport"]`` (also with no passport). The passport's model provenance holds ``arithmetic``
    (common.inference.precision.describe: exact or approximate)."""
    import numpy as np

    from common.records.passport import build_passport, scan_metadata

    t0 = time.perf_counter()
    passport = lab_img = None
    # a file's run-key digest is its sha256 (a folder's also covers file names: hashed again)
    file_digest = key["input_sha256"] if key is not None and scan.is_file() else None
    if not opts.no_passport:
        lab_img = run.result.labels_model_res if opts.passport_resolution == "model" else run.result.labels
        passport = build_passport(np.asanyarray(lab_img.dataobj), lab_img.affine, spec.labels,
                                  scan=scan_metadata(scan, run.volume.image, sha256=file_digest),
                                  model={**spec.provenance(), "arithmetic": arithmetic},
                                  resolution=opts.passport_resolution,
                                  max_points=opts.max_points)
    stages["passport"] = time.perf_counter() - t0
    return passport, lab_img


def _check_room(vol, out_dir: Path) -> None:
    """Before the work: refuse (InputError, one line) when ``out_dir``'s filesystem cannot hold the label map
    (common.imaging.official_output.min_nifti_bytes: a lower bound)."""
    import numpy as np

    from common.core.disk_space import check_free_space
    from common.imaging.official_output import min_nifti_bytes

    check_free_space(out_dir, min_nifti_bytes(int(np.prod(vol.shape[:3])), 1), "the label map (at least)")


def _write_outputs(scan: Path, run, passport, key: dict | None, files: _ScanFiles, stages: dict):
    """Write the scan's output set as a whole or not at all (common.core.staging.StagedFiles): the label map
    (as the official tool does), the passport when there is one and the run key are written into a staging
    folder, then put in place, the earlier run record removed first and the new one renamed last, so that only
    a complete set looks complete. A failure (a full disk) leaves nothing of this run and the earlier set as it
    was. The time (s) is added to ``stages["save"]``. Returns the label array written (the scan's grid, axes as
    in the NIfTI file)."""
    import numpy as np

    from common.core.staging import StagedFiles
    from common.imaging.mask_io import save_labels
    from common.imaging.official_output import official_header
    from common.records import resume
    from common.records.passport import save_passport

    t0 = time.perf_counter()
    labels = np.asanyarray(run.result.labels.dataobj)
    obsolete = (files.run,) if passport is not None else (files.run, files.passport)  # no stale passport
    with StagedFiles(files.mask.parent, _staging_key(files), remove_first=obsolete) as stage:
        save_labels(labels, run.volume.affine, stage.path(files.mask.name),
                    header=official_header(run.volume.image))  # as the official tool
        if passport is not None:
            save_passport(passport, stage.path(files.passport.name))
        if key is not None:  # staged last, so renamed last: only a scan whose outputs are all written looks complete
            resume.write_key(stage.path(files.run.name), key, scan=str(scan), mask=files.mask.name,
                             passport=files.passport.name if passport is not None else None)
    stages["save"] = stages.get("save", 0.0) + time.perf_counter() - t0
    return labels
