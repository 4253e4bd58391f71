"""Scan I/O at the edge of the pipeline: NIfTI files and DICOM series folders -> nibabel images.

Arrays are nibabel-ordered (x, y, z) voxel axes; affines map voxel indices to world mm, RAS+.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common.atomic import atomic_save_nifti
from common.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def scan_id(path: str | Path) -> str:
    """File name without .nii/.nii.gz (or the folder name of a DICOM series)."""
    name = Path(path).name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


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


def _load_dicom_series(folder: Path) -> nib.Nifti1Image:
    """Read the first DICOM series in ``folder`` with SimpleITK; return a RAS+ NIfTI image."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(folder, "folder holds no DICOM series (and is not a NIfTI file)")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(folder, f"unreadable DICOM series ({str(exc).splitlines()[0]})") from exc
    return sitk_to_nifti(img)


def sitk_to_nifti(img) -> nib.Nifti1Image:
    """Convert a SimpleITK image (LPS world, array (z, y, x)) to a nibabel image (RAS+, array (x, y, z))."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    data = np.ascontiguousarray(arr.transpose(2, 1, 0)) if arr.ndim == 3 else arr.T
    ndim = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:ndim, :ndim] = direction * spacing[None, :]
    affine[:ndim, 3] = origin
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return nib.Nifti1Image(data, lps_to_ras @ affine)


def load_volume(path: str | Path) -> Volume:
    """Load a NIfTI file or a DICOM series folder. Raises InputError (one line) on failure."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        return Volume(path, _load_dicom_series(path))
    if not is_nifti_path(path):
        raise InputError(path, "not a NIfTI file (.nii/.nii.gz) or a DICOM series folder")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Nifti1Image):
        img = nib.Nifti1Image.from_image(img)
    return Volume(path, img)


def save_labels(labels: np.ndarray, affine: np.ndarray, target: str | Path,
                header: nib.Nifti1Header | None = None) -> Path:
    """Save an (x, y, z) label map as uint8 (uint16 if needed) NIfTI atomically."""
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    img = nib.Nifti1Image(np.asarray(labels, dtype=dtype), affine, header)
    img.set_data_dtype(dtype)
    return atomic_save_nifti(img, target)
