"""The output set of ``totalseg-fast --ml --statistics --passport`` for a segmentation the user gave
(common.imaging.segmentation_input) instead of one of ours: the label map with the official header extension, the
official statistics and the anatomical passport.

Differences from a segmentation of ours, by necessity: statistics are computed by the official function on the
label map's own grid (the scan's), not on the 3 mm model grid (there is none); the passport is on that grid
("original" resolution) and its ``model`` block names the file, with no weights kind (registration treats its
provenance as unknown, registration/provenance.py).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib

from common.imaging.official_output import statistics, write_multilabel, write_statistics
from common.imaging.segmentation_input import UserSegmentation
from common.imaging.volume import Volume
from common.records.passport import build_passport, save_passport, scan_metadata
from common.records.passport_model import Passport

USER_SOURCE = "user segmentation"


def user_passport(scan: Volume, seg: UserSegmentation, max_points: int = 500) -> Passport:
    """The passport of ``seg`` on ``scan``'s grid (world mm, RAS+), ``max_points`` boundary points per structure."""
    return build_passport(seg.labels, scan.affine, seg.names, scan=scan_metadata(scan.path, scan.image),
                          model={"source": USER_SOURCE, "file": str(seg.source), "kind": seg.kind},
                          resolution="original", max_points=max_points)


def user_statistics(scan: Volume, seg: UserSegmentation) -> dict[str, dict[str, float]]:
    """statistics.json's content for ``seg``: the official function (volume mm³, mean HU, 0 for a structure
    touching the border) on the scan's grid."""
    return statistics(nib.Nifti1Image(seg.labels, scan.affine), scan.image, None)


def write_user_outputs(scan: Volume, seg: UserSegmentation, ml_file: Path, statistics_file: Path,
                       passport_file: Path, max_points: int = 500) -> None:
    """The --ml label map, statistics.json and passport.json of ``seg``, each written atomically."""
    write_multilabel(seg.labels, scan.image, {k: v for k, v in seg.names.items() if k != 0}, ml_file)
    write_statistics(user_statistics(scan, seg), statistics_file)
    save_passport(user_passport(scan, seg, max_points), passport_file)
