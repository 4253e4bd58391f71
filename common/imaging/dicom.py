"""DICOM input: a series folder or a zip of one -> the nibabel image the official tool gets from it.

The official tool converts DICOM with dicom2nifti (``totalsegmentator/dicom_io.py::dcm_to_nifti`` calls
``dicom2nifti.dicom_series_to_nifti(folder, out, reorient_nifti=True)``, validation on) and segments the NIfTI
file it writes; its masks are on that grid. For an axial series that grid is LAS: array (x, y, z) with x from
the patient's right to left, y from posterior to anterior, z from inferior to superior, voxel sizes
(PixelSpacing[1], PixelSpacing[0], slice step) in mm, the affine's origin the world (RAS+, mm) position of the
right-posterior-inferior corner voxel, stored as float32 in the sform (code 2, qform code 0), voxel values
float64 HU (rescale slope/intercept applied by pydicom's modality LUT). We get exactly that by running the
same conversion (``dicom2nifti.convert_dicom.dicom_array_to_nifti``, what ``dicom_series_to_nifti`` calls
after reading the folder the same way) on the chosen series in a temporary folder and loading the file it
writes, rather than re-deriving dicom2nifti's reorientation rules from SimpleITK's LPS grid.

Before converting, the series is chosen and checked here, with pydicom headers (pixel data deferred):
- series are told apart by SeriesInstanceUID, whatever the file names; the CT series with the most slices
  is taken (a scout/localizer does not count as CT), else the largest image series with a warning; the
  others are named in a warning; a folder with no image series (only RTSTRUCT, SEG...) is an error;
- after converting, a slice whose RescaleSlope/RescaleIntercept differ from its neighbours' so that its HU jump
  while its stored values are continuous with theirs (an export error) is named in a warning
  (common.imaging.dicom_checks.check_rescale); its HU are left as dicom2nifti gives them;
- a missing, duplicated or unevenly spaced slice, slices of different size or orientation, gantry tilt, a
  truncated or unreadable slice file and multi-frame (enhanced) files are InputErrors (one line, naming the
  folder or zip and the problem), never a silently wrong grid. Positions are compared along the slice normal
  (row x column direction cosines of ImageOrientationPatient), with a tolerance of 1 % of the slice step
  (at least POSITION_ATOL_MM) for rounding in the headers.

Modules: common.imaging.dicom_series (which files are DICOM, headers, series, the choice), common.imaging.dicom_checks (the
regular-grid checks, the per-slice rescale warning), common.imaging.dicom_zip (safe zip extraction); conversion and the entry points are here.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from common.core.errors import InputError
from common.core.machine import available_memory_bytes
from common.core.text import fmt_bytes
from common.imaging.dicom_checks import check_rescale, check_series, drop_localizers
from common.imaging.dicom_series import (
    FOLDER_KIND,
    MIN_SLICES,
    ZIP_KIND,
    Source,
    choose_series,
    first_line,
    read_series,
)
from common.imaging.dicom_zip import extract_zip

# dicom2nifti's exception codes -> what they mean for the user
DICOM2NIFTI_CODES = {
    "NON_IMAGING_DICOM_FILES": "the files hold no image slices",
    "TOO_FEW_SLICES/LOCALIZER": f"too few slices for a volume (at least {MIN_SLICES}; a scout/localizer?)",
    "IMAGE_ORIENTATION_INCONSISTENT": "the slices have different orientations",
    "NON_CUBICAL_IMAGE/GANTRY_TILT": "gantry tilt (slices not stacked along their normal)",
    "SLICE_INCREMENT_INCONSISTENT": "the slice spacing varies (a missing slice?)",
    "NOT_A_VOLUME": "all slices lie at the same position",
    "MISSING_DICOM_FILES": "slices are missing",
    "NO_DICOM_FILES_FOUND": "no DICOM files",
}


# ---------------------------------------------------------------------------------------------
# conversion (dicom2nifti, as the official tool)
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """dicom2nifti logs its validation details as warnings; our InputError says it in one line instead."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def convert(slices: list, source: Source) -> nib.Nifti1Image:
    """``slices`` converted by dicom2nifti exactly as the official tool does (validation on, reoriented), written
    to a temporary .nii and loaded back (sform stored as float32, as the official masks' grid); data in memory."""
    from dicom2nifti import convert_dicom
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    n_bytes = rows * cols * len(slices) * 8 * 2  # float64 HU: dicom2nifti's volume + the copy loaded back
    available = available_memory_bytes()
    if available is not None and n_bytes > available:
        raise InputError(source.label, f"{rows}x{cols}x{len(slices)} voxels need about {fmt_bytes(n_bytes)} of "
                                       f"memory to convert, {fmt_bytes(available)} available")
    with tempfile.TemporaryDirectory(prefix="ts-bench-dicom-", ignore_cleanup_errors=True) as tmp:
        out = Path(tmp) / "converted_dcm.nii"
        try:
            with _quiet_logger("dicom2nifti"):
                convert_dicom.dicom_array_to_nifti(slices, str(out), reorient_nifti=True)
        except (ConversionValidationError, ConversionError) as exc:
            code = first_line(exc)
            raise InputError(source.label, f"dicom2nifti (the official tool's converter) refuses the series: "
                                           f"{DICOM2NIFTI_CODES.get(code, code)} ({code})") from exc
        except MemoryError:
            raise InputError(source.label, "not enough memory to convert the DICOM series") from None
        except OSError as exc:  # a slice file gone, or the temporary folder full
            raise InputError(source.label, f"I/O error while converting the DICOM series ({type(exc).__name__}: "
                                           f"{exc.strerror or first_line(exc)})") from exc
        except Exception as exc:  # pydicom decoders and dicom2nifti raise many types for bad pixel data
            raise InputError(source.label, f"cannot convert the DICOM series ({type(exc).__name__}: "
                                           f"{first_line(exc)}); corrupt or unsupported pixel data?") from exc
        loaded = nib.load(str(out), mmap=False)
        data = np.asanyarray(loaded.dataobj)
        image = nib.Nifti1Image(data, loaded.affine, loaded.header)
    if data.ndim != 3:
        raise InputError(source.label, f"dicom2nifti reads the series as a {data.ndim}D image (shape "
                                       f"{'x'.join(map(str, data.shape))}): the InstanceNumber order does not follow "
                                       "the slice positions, or the folder mixes acquisitions")
    return image


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns (Python warnings and its logger) about invalid values as it decodes them, lazily; a
    corrupt file is reported by our one-line InputError instead."""
    with warnings.catch_warnings(), _quiet_logger("pydicom"):
        warnings.simplefilter("ignore", UserWarning)
        yield


def load_series(source: Source, recursive: bool) -> nib.Nifti1Image:
    """Read, choose, check and convert the series under ``source``; warnings in ``image.extra["warnings"]``."""
    with _quiet_pydicom():
        return _load_series(source, recursive)


def _load_series(source: Source, recursive: bool) -> nib.Nifti1Image:
    chosen, said = choose_series(read_series(source, recursive), source)
    if chosen.multiframe:
        raise InputError(source.label, f"{chosen.describe()} is multi-frame (enhanced) DICOM, which is not "
                                       "supported; export it as one file per slice")
    slices, notes = drop_localizers(chosen)
    if not slices:
        raise InputError(source.label, f"{chosen.describe()} holds only localizer slices; no volume to segment")
    check_series(slices, source)
    image = convert(slices, source)
    notes += check_rescale(slices, image, source)  # a warning only: the HU stay as dicom2nifti gives them
    image.extra["warnings"] = said + [f"{source.label}: {n}" for n in notes]
    return image


def load_dicom_folder(folder: str | Path) -> nib.Nifti1Image:
    """The series in ``folder`` (its files only, any names; subfolders are series of their own), as the
    official tool's dicom2nifti grid: (x, y, z) array, RAS+ affine in mm (LAS for an axial series)."""
    folder = Path(folder)
    return load_series(Source(folder, folder, FOLDER_KIND), recursive=False)


def load_dicom_zip(path: str | Path) -> nib.Nifti1Image:
    """The DICOM series in a zip (at its top or in sub-folders), extracted to a temporary folder that is always
    removed; as ``load_dicom_folder``. InputError for an unsafe or oversized zip, or one without a DICOM series."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="ts-bench-zip-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp) / "extracted"
        root.mkdir()
        extract_zip(path, root)
        return load_series(Source(path, root, ZIP_KIND), recursive=True)


@contextlib.contextmanager
def series_reference(path: str | Path) -> Iterator[Path]:
    """A temporary folder holding (as links) only the image files of the series that ``load_volume(path)``
    segments (a folder or a zip; localizers left out), for writers that read a whole folder as the reference
    series (the official DICOM SEG / RTSTRUCT writers); removed on leaving the block."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="ts-bench-ref-", ignore_cleanup_errors=True) as tmp:
        if path.is_file():
            root = Path(tmp) / "extracted"
            root.mkdir()
            extract_zip(path, root)
            source, recursive = Source(path, root, ZIP_KIND), True
        else:
            source, recursive = Source(path, path, FOLDER_KIND), False
        with _quiet_pydicom():
            chosen, _ = choose_series(read_series(source, recursive), source)
            slices, _ = drop_localizers(chosen)
        ref = Path(tmp) / "series"
        ref.mkdir()
        for k, ds in enumerate(slices):
            (ref / f"{k:05d}.dcm").symlink_to(Path(ds.filename).resolve())
        yield ref
