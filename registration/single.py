"""One scan, segmented and summarised: the single-scan work of the clinical app (registration/clinical_app.py),
without any user interface.

Ours: totalseg-fast's own per-scan function (common.cli.console_scan.segment_scan) with ``--ml --statistics
--passport`` into a folder, so that the label map, statistics.json and passport.json are exactly what
``totalseg-fast -i SCAN -o FOLDER/segmentations.nii.gz --ml --statistics --passport`` writes. A user's own
segmentation: the same three files from it (common.records.segmentation_outputs). The table then has, per
structure present, statistics.json's volume (mm³) and mean HU (0 for a structure touching the border, as the
official tool) beside the label map's own figures on the scan's grid (common.imaging.structure_stats): volume in
mL, mean HU, and whether it touches the border.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.core.errors import InputError
from common.imaging.volume import Volume
from registration.followup import ScanChoice

ML_NAME, STATISTICS_NAME, PASSPORT_NAME = "segmentations.nii.gz", "statistics.json", "passport.json"


@dataclass
class SingleResult:
    """``volume`` (checked scan), ``labels`` (x, y, z) on its grid with ``names``, ``files`` ("ml", "statistics",
    "passport" -> path), ``statistics`` (statistics.json's content), ``source`` (which segmentation, one line)."""

    choice: ScanChoice
    volume: Volume
    labels: np.ndarray
    names: dict[int, str]
    files: dict[str, Path]
    statistics: dict[str, dict[str, float]]
    source: str
    messages: list[str] = field(default_factory=list)


def _files(folder: Path) -> dict[str, Path]:
    return {"ml": folder / ML_NAME, "statistics": folder / STATISTICS_NAME, "passport": folder / PASSPORT_NAME}


def segment_single(choice: ScanChoice, folder: Path, session: Any,
                   on_tiles: Callable[[int], None] | None = None) -> SingleResult:
    """``choice.scan`` segmented by totalseg-fast's per-scan function into ``folder`` with ``session``
    (registration.app_model.ModelSession); ``on_tiles(n)`` reports the model's progress. InputError: one line."""
    from common.cli.console_scan import ScanTargets, segment_scan
    from common.cli.scan_outputs import ScanOptions
    from registration.app_model import CountingPredictor

    folder.mkdir(parents=True, exist_ok=True)
    files = _files(folder)
    targets = ScanTargets(seg=files["ml"], statistics=files["statistics"], preview=folder / "preview_total.png",
                          passport=files["passport"], folder=None)
    spec = session.spec
    label_map = {k: v for k, v in spec.labels.items() if k != 0}
    predictor = session.predictor if on_tiles is None else CountingPredictor(session.predictor, on_tiles)
    options = ScanOptions(ml=True, statistics=True, passport=True, nr_thr_saving=1)
    try:
        with session.lock:  # one segmentation at a time on the shared predictor
            said = segment_scan(choice.scan, choice.scan_id, targets, options, label_map, None, spec, predictor,
                                session.cfg)
    except OSError as exc:
        raise InputError(folder, f"cannot write the outputs ({exc.strerror or type(exc).__name__})") from None
    source = f"segmentation: this suite's fast model ({spec.provenance()['weights']} weights), as totalseg-fast"
    return _read_back(choice, files, dict(spec.labels), source, [line for kind, line in said if kind == "warning"])


def own_single(choice: ScanChoice, folder: Path) -> SingleResult:
    """The user's segmentation ``choice.segmentation`` of ``choice.scan`` made into the same three files."""
    from common.imaging.segmentation_input import load_segmentation
    from common.imaging.validation import load_scan
    from common.records.segmentation_outputs import write_user_outputs

    if choice.segmentation is None:
        raise InputError(choice.scan, "no segmentation given")
    folder.mkdir(parents=True, exist_ok=True)
    files = _files(folder)
    volume, warnings = load_scan(choice.scan)  # the scan's warnings, as totalseg-fast prints them
    seg = load_segmentation(choice.segmentation, volume)
    write_user_outputs(volume, seg, files["ml"], files["statistics"], files["passport"])
    return _read_back(choice, files, seg.names, f"segmentation: {seg.describe()}", [f"warning: {w}" for w in warnings],
                      volume)


def _read_back(choice: ScanChoice, files: dict[str, Path], names: dict[int, str], source: str,
               messages: list[str], volume: Volume | None = None) -> SingleResult:
    """The result from the files written (what the user downloads is what the page shows); ``volume``: the scan,
    when already loaded."""
    from common.imaging.mask_io import align_to_grid, load_label_map
    from registration.inputs import load_checked_scan

    volume = volume if volume is not None else load_checked_scan(choice.scan)
    loaded = load_label_map(files["ml"])
    aligned = align_to_grid(volume.shape[:3], volume.affine, loaded.data, loaded.affine, "scan")
    if aligned.problem:
        raise InputError(files["ml"], aligned.problem)
    stats = json.loads(files["statistics"].read_text(encoding="utf-8"))
    return SingleResult(choice, volume, aligned.data, names, files, stats, source, messages)


def single_rows(result: SingleResult) -> list[dict[str, Any]]:
    """One row per structure present: the label map's figures on the scan's grid (volume mL, mean HU, touches the
    border) and statistics.json's volume (mm³) and mean HU (None when statistics.json has no such class)."""
    from common.imaging.structure_stats import structure_figures

    ct = np.asanyarray(result.volume.image.dataobj)
    rows = []
    for f in structure_figures(result.labels, ct, result.volume.spacing, result.names):
        official = result.statistics.get(f.name)
        rows.append({"structure": f.name, "label": f.label, "volume_ml": f.volume_mm3 / 1000.0, "mean_hu": f.mean_hu,
                     "touches_border": f.touches_border,
                     "statistics_volume_mm3": None if official is None else float(official["volume"]),
                     "statistics_mean_hu": None if official is None else float(official["intensity"])})
    return rows
