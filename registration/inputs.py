"""Checked loading of registration inputs (passports, scans, label maps) and the help text shared by the CLIs."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from common.core.errors import InputError

if TYPE_CHECKING:
    from common.imaging.volume import Volume
    from common.records.passport_model import Passport

FLOOR_HELP = "0 or any value below the floor means the floor: one control point per structure plus the centroids"


def load_checked_passport(path: Path) -> Passport:
    """A valid passport whose points can anchor a registration, else InputError naming ``path``."""
    from common.records.passport import load_passport
    from registration.structures import geometry_problem

    passport = load_passport(path)
    problem = geometry_problem(passport)
    if problem:
        raise InputError(path, f"{problem}: the passport is corrupt; rebuild it from its label map")
    return passport


def load_checked_scan(path: Path, modality: str = "CT") -> Volume:
    """The scan (or label map, modality "ANY") as a checked common.imaging.volume.Volume: RGB, 2-D/4-D, voxel size,
    NaN, truncated data, a header that claims more than the file holds...: InputError naming ``path``."""
    from common.imaging.validation import load_scan

    return load_scan(path, modality)[0]
