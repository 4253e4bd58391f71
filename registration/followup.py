"""A baseline and a follow-up CT, each segmented (or given with the user's own segmentation), then registered:
the follow-up work of the clinical app (registration/clinical_app.py), without any user interface.

- ``prepare``: one scan's label map (x, y, z, on the scan's grid) and passport. Ours come from 06's own per-scan
  job (common.runs.scan_job.segment_and_passport) writing into 06's output folder with 06's resume keys, so a scan
  06 already segmented is reused, never computed twice, and one segmented here is up to date for 06. A user's
  segmentation is read by common.imaging.segmentation_input and its passport built on the scan's grid.
- ``register``: registration/register.py itself (its parser and ``run``): rigid then thin-plate spline, the
  follow-up as MOVING onto the baseline as FIXED; writes transform.json, registration.json and overlay.png.
Errors are InputError (one line naming the file), as the command lines give them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.core.errors import InputError
from common.imaging.volume import Volume
from registration.options import DeformableOptions, RigidOptions


@dataclass(frozen=True)
class ScanChoice:
    """One scan as chosen: ``scan`` (NIfTI, DICOM folder or zip), its ``scan_id`` (06's output stem) and, when the
    user gives one, ``segmentation`` (label map file, mask folder or zip) used instead of segmenting."""

    scan: Path
    scan_id: str
    segmentation: Path | None = None


@dataclass
class Prepared:
    """A scan ready to compare: ``volume`` (loaded and checked), ``labels`` (x, y, z) on its grid with ``names``,
    ``passport`` (file), ``source`` (one line: which segmentation) and the ``messages`` said on the way."""

    choice: ScanChoice
    volume: Volume
    labels: np.ndarray
    names: dict[int, str]
    passport: Path
    source: str
    messages: list[str] = field(default_factory=list)


def prepare(choice: ScanChoice, work: Path, out06: Path, session: Any | None,
            on_tiles: Callable[[int], None] | None = None) -> Prepared:
    """``choice`` segmented into 06's folder ``out06`` with ``session`` (registration.app_model.ModelSession), or
    its own segmentation read (its passport written into ``work``). ``on_tiles(n)``: progress of the model."""
    from registration.inputs import load_checked_scan

    if choice.segmentation is not None:
        from common.imaging.segmentation_input import load_segmentation
        from common.records.passport import save_passport
        from common.records.segmentation_outputs import user_passport

        volume = load_checked_scan(choice.scan)
        seg = load_segmentation(choice.segmentation, volume)
        tag = hashlib.sha256(f"{choice.scan}\0{choice.segmentation}".encode()).hexdigest()[:12]  # one per pair
        passport = save_passport(user_passport(volume, seg), work / f"{choice.scan_id}_{tag}_user_passport.json")
        return Prepared(choice, volume, seg.labels, seg.names, passport, f"segmentation: {seg.describe()}")
    if session is None:
        raise InputError(choice.scan, "no model session to segment it with")
    return _ours(choice, out06, session, on_tiles)


def _ours(choice: ScanChoice, out06: Path, session: Any, on_tiles: Callable[[int], None] | None) -> Prepared:
    """06's per-scan job on ``choice.scan`` (reused when up to date), then its label map and passport read back."""
    from common.cli.args import check_outputs
    from common.imaging.mask_io import align_to_grid, load_label_map
    from common.runs.scan_job import UP_TO_DATE, JobOptions, outputs_for, segment_and_passport
    from registration.app_model import MAX_POINTS, PASSPORT_RESOLUTION, CountingPredictor
    from registration.inputs import load_checked_scan

    check_outputs(folders=(out06,))  # OSError, one line
    opts = JobOptions(out=out06, no_passport=False, force=False, passport_resolution=PASSPORT_RESOLUTION,
                      max_points=MAX_POINTS, passport_repeats=1, key_config=session.key_config)
    predictor = session.predictor if on_tiles is None else CountingPredictor(session.predictor, on_tiles)
    with session.lock:  # one segmentation at a time on the shared predictor
        outcome = segment_and_passport(choice.scan, choice.scan_id, opts, session.spec, predictor, session.cfg)
    if outcome.skipped is not None and outcome.skipped != UP_TO_DATE:
        raise InputError(choice.scan, f"not segmented: {outcome.skipped}; try again in a moment")
    if outcome.record is not None and outcome.record.get("status") == "failed":
        raise InputError(None, outcome.record["error"])
    mask, passport = outputs_for(out06, choice.scan_id)
    volume = load_checked_scan(choice.scan)
    loaded = load_label_map(mask)
    aligned = align_to_grid(volume.shape[:3], volume.affine, loaded.data, loaded.affine, "scan")
    if aligned.problem:
        raise InputError(mask, aligned.problem)
    weights = session.spec.provenance()["weights"]
    how = (f"reused 06's outputs in {out06} (up to date: same scan, weights and configuration)"
           if outcome.skipped == UP_TO_DATE else f"segmented now; saved with 06's outputs in {out06}")
    return Prepared(choice, volume, aligned.data, dict(session.spec.labels), passport,
                    f"segmentation: this suite's fast model ({weights} weights), {how}", list(outcome.messages))


@dataclass(frozen=True)
class RegistrationSettings:
    """register.py's options (same names, units and defaults): mm, RBFInterpolator smoothing units, points."""

    deformable: bool = True
    smoothing: float = DeformableOptions().smoothing
    residual_threshold_mm: float = RigidOptions().residual_threshold_mm
    max_control_points: int = DeformableOptions().max_control_points
    allow_mixed_weights: bool = False

    def argv(self, baseline: Prepared, followup: Prepared, out: Path) -> list[str]:
        """register.py's command line for this pair (the follow-up moving onto the baseline) into ``out``."""
        argv = ["--fixed-passport", str(baseline.passport), "--moving-passport", str(followup.passport),
                "--fixed-scan", str(baseline.choice.scan), "--moving-scan", str(followup.choice.scan),
                "--out", str(out), "--smoothing", repr(float(self.smoothing)),
                "--residual-threshold", repr(float(self.residual_threshold_mm)),
                "--max-control-points", str(int(self.max_control_points))]
        return argv + (["--no-deformable"] if not self.deformable else []) + \
            (["--allow-mixed-weights"] if self.allow_mixed_weights else [])


def register(baseline: Prepared, followup: Prepared, out: Path, settings: RegistrationSettings) -> dict[str, Any]:
    """registration/register.py on the pair: its report (registration.json's content, with "outputs"). Its
    warnings (provenance mismatches) are in ``report["provenance"]["mismatches"]``."""
    from common.cli.args import check_outputs
    from registration import register as cli

    argv = settings.argv(baseline, followup, out)
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit:  # the settings are checked by the widgets; a value the parser refuses ends here
        raise InputError(None, f"registration options refused: {' '.join(argv[argv.index('--smoothing'):])}") from None
    check_outputs(folders=(out,))
    try:
        return cli.run(args)
    except ValueError as exc:  # InputError passes as it is; another ValueError is register.py's own failure
        if isinstance(exc, InputError):
            raise
        raise InputError(None, f"registration/register.py failed on this pair ({type(exc).__name__}: {exc}); "
                               "try it rigid only, or with more smoothing") from None


def warped_followup(baseline: Prepared, followup: Prepared, transform: Any) -> tuple[np.ndarray, np.ndarray]:
    """The follow-up CT (trilinear, float32 HU) and label map (nearest; ids renumbered to the baseline's for the
    same class name) pulled onto the baseline's grid through ``transform`` (registration.transform), (x, y, z)."""
    from registration.transform import warp_image, warp_labels

    shape, affine = baseline.volume.shape[:3], baseline.volume.affine
    ct = warp_image(np.asarray(followup.volume.image.dataobj, dtype=np.float32), followup.volume.affine, shape,
                    affine, transform)
    by_name = {name: k for k, name in baseline.names.items()}
    lut = np.arange(int(followup.labels.max(initial=0)) + 1, dtype=np.int64)
    for k, name in followup.names.items():
        if k < len(lut) and name in by_name:
            lut[k] = by_name[name]
    lut = lut.astype(np.uint16 if lut.max(initial=0) > 255 else np.uint8)
    labels = warp_labels(lut[followup.labels], followup.volume.affine, shape, affine, transform)
    return ct, labels
