"""A scan as loaded: a NIfTI file, a DICOM series folder or a zip of one -> ``Volume`` (a nibabel image).

Arrays are nibabel-ordered (x, y, z) voxel axes; affines map voxel indices to world mm, RAS+.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common.core.errors import InputError
from common.imaging.dicom import load_dicom_folder, load_dicom_zip
from common.imaging.nifti_guard import check_declared_size
from common.imaging.scan_paths import is_nifti_path, is_zip_path


@dataclass
class Volume:
    """A scan as loaded: ``image`` is a nibabel image whose data are (x, y, z), affine in RAS+ mm."""

    path: Path
    image: nib.Nifti1Image

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.image.shape)

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along the (x, y, z) array axes (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


def _load_dicom_series(path: Path) -> nib.Nifti1Image:
    """The DICOM series in a folder (its files, any names) or a zip (common.imaging.dicom): the image the official
    tool's dicom2nifti conversion gives, (x, y, z) array in HU, RAS+ affine in mm (LAS for an axial series).

    Several series: the CT series with the most slices, the others named in ``image.extra["warnings"]``
    (load_scan reports them). A missing/duplicated/unevenly spaced slice, gantry tilt or a truncated file is
    an InputError (one line), never a silently wrong grid.
    """
    return load_dicom_zip(path) if path.is_file() and is_zip_path(path) else load_dicom_folder(path)


def load_volume(path: str | Path) -> Volume:
    """Load a NIfTI file, a DICOM series folder or a zip of one. Raises InputError (one line) on failure."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir() or str(path).lower().endswith(".zip"):
        return Volume(path, _load_dicom_series(path))
    if not is_nifti_path(path):
        raise InputError(path, "not a NIfTI file (.nii/.nii.gz), a DICOM series folder or a zip of one")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    check_declared_size(path, img)  # before anything reads (allocates) the voxel data
    if not isinstance(img, nib.Nifti1Image):
        img = nib.Nifti1Image.from_image(img)
    return Volume(path, img)
