"""What a path names, from its name alone: a NIfTI file, a zip, and the scan id a file or folder gives."""
from __future__ import annotations

from pathlib import Path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_zip_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".zip")


def scan_id(path: str | Path) -> str:
    """File name without .nii/.nii.gz/.zip (or the folder name of a DICOM series)."""
    name = Path(path).name
    for suf in (".nii.gz", ".nii", ".zip"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name
