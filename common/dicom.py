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
- a missing, duplicated or unevenly spaced slice, slices of different size or orientation, gantry tilt, a
  truncated or unreadable slice file and multi-frame (enhanced) files are InputErrors (one line, naming the
  folder or zip and the problem), never a silently wrong grid. Positions are compared along the slice normal
  (row x column direction cosines of ImageOrientationPatient), with a tolerance of 1 % of the slice step
  (at least POSITION_ATOL_MM) for rounding in the headers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from common.errors import DownloadError, InputError
from common.volume import available_memory_bytes, fmt_bytes

DICOM_MAGIC = b"DICM"  # Part 10 files: 128-byte preamble, then "DICM"
RAW_DATASET_GROUPS = (0x0002, 0x0008)  # a dataset written without the preamble starts with one of these groups
# Not images: structure sets, segmentations, dose grids, reports, presentation states, key objects, registrations.
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "SEG", "RTDOSE", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG",
                                  "RWV", "DOC", "FID", "PLAN"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
MIN_SLICES = 4  # dicom2nifti's validate_slicecount refuses 3 or fewer (a localizer, it says)
SPACING_RTOL = 0.01  # slice steps may differ by 1 % (header rounding) ...
POSITION_ATOL_MM = 0.02  # ... or by this much (positions written with 2 decimals)
ORIENTATION_ATOL = 1e-3  # direction cosines: dicom2nifti's own tolerance for "same orientation"
ZIP_CHUNK_BYTES = 1 << 20
ZIP_KIND = "zip archive"
FOLDER_KIND = "folder"
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
# detection
# ---------------------------------------------------------------------------------------------
def is_dicom_file(path: Path) -> bool:
    """True for a file whose content is DICOM: the Part 10 preamble ("DICM" at byte 128), or a dataset written
    without it (starting with a group 0002/0008 element, as some old exporters do); also any ``*.dcm`` (a
    broken one is then reported by the loader, not silently skipped)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == DICOM_MAGIC or _is_raw_dataset(head)


def _is_raw_dataset(head: bytes) -> bool:
    """A little-endian dataset without preamble: (0002|0008, small element) then an explicit VR or a short length."""
    if len(head) < 8 or int.from_bytes(head[0:2], "little") not in RAW_DATASET_GROUPS:
        return False
    if int.from_bytes(head[2:4], "little") > 0x0100:
        return False
    return (head[4:6].isalpha() and head[4:6].isupper()) or int.from_bytes(head[4:8], "little") < 1024


def is_zip_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".zip")


# ---------------------------------------------------------------------------------------------
# reading headers and choosing the series
# ---------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """Where the files come from: ``label`` (the folder or zip the user gave, used in messages), ``root`` (the
    folder read: the series folder itself, or the zip's extraction folder), ``kind`` ("folder"/"zip archive")."""

    label: Path
    root: Path
    kind: str

    def name(self, path: Path) -> str:
        """A file's name for messages: relative to the series folder or to the zip's top."""
        return str(path.relative_to(self.root))


@dataclass
class _Series:
    uid: str
    datasets: list = field(default_factory=list)

    @property
    def first(self):
        return self.datasets[0]

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", "") or "?").upper()

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "").strip()

    @property
    def multiframe(self) -> bool:
        return any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in self.datasets)

    @property
    def n_slices(self) -> int:
        return sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in self.datasets)

    @property
    def is_image(self) -> bool:
        return self.modality not in NON_IMAGE_MODALITIES and any("PixelData" in ds for ds in self.datasets)

    @property
    def localizer(self) -> bool:
        return all("LOCALIZER" in _image_type(ds) for ds in self.datasets)

    @property
    def is_ct_volume(self) -> bool:
        return self.modality == "CT" and not self.localizer and self.n_slices >= MIN_SLICES

    def describe(self) -> str:
        what = f"{self.modality} series {self.uid}"
        if self.description:
            what += f" {self.description!r}"
        if self.localizer:
            what += " (localizer)"
        n = len(self.datasets)
        frames = f", {self.n_slices} frames" if self.multiframe else ""
        return f"{what} ({n} file{'s' if n != 1 else ''}{frames})"


def _image_type(ds) -> list[str]:
    """ImageType (0008,0008) values, upper case ([] when absent)."""
    value = ds.get("ImageType", None)
    if value is None:
        return []
    return [str(value).upper()] if isinstance(value, str) else [str(v).upper() for v in value]


def _dicom_files(source: _Source, recursive: bool) -> list[Path]:
    """The DICOM files (by content) under ``source.root``; hidden entries left out; sorted by path."""
    if recursive:
        found = []
        for top, dirs, files in os.walk(source.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(top) / f for f in files if not f.startswith(".")]
    else:
        found = [p for p in source.root.iterdir() if not p.name.startswith(".")]
    return sorted(p for p in found if is_dicom_file(p))


def _read_header(path: Path, source: _Source):
    """The file's dataset as dicom2nifti reads it (pixel data deferred), or None for a non-image object such as
    a DICOMDIR. InputError for a file that is not readable DICOM or is truncated."""
    import pydicom

    with open(path, "rb") as fh:
        head = fh.read(132)
    force = head[128:132] != DICOM_MAGIC  # dicom2nifti itself only reads files with the preamble
    try:
        ds = pydicom.dcmread(str(path), defer_size="1 KB", force=force)
    except Exception as exc:  # InvalidDicomError, EOFError, struct/Unicode errors...: pydicom raises many types
        raise InputError(source.label, f"{source.name(path)} in the {source.kind} is not a readable DICOM file "
                                       f"({type(exc).__name__}: {_first_line(exc)}); corrupt or truncated?") from exc
    sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") if hasattr(ds, "file_meta") else "")
    if sop == DICOMDIR_SOP_CLASS or (ds.get("SOPClassUID", None) == DICOMDIR_SOP_CLASS):
        return None
    if "SeriesInstanceUID" not in ds:
        raise InputError(source.label, f"{source.name(path)} in the {source.kind} is not a readable DICOM image (no "
                                       "SeriesInstanceUID); corrupt or truncated file?")
    return ds


def read_series(source: _Source, recursive: bool) -> list[_Series]:
    """All series found under ``source``, in order of their first file."""
    by_uid: dict[str, _Series] = {}
    for path in _dicom_files(source, recursive):
        ds = _read_header(path, source)
        if ds is not None:
            uid = str(ds.SeriesInstanceUID)
            by_uid.setdefault(uid, _Series(uid)).datasets.append(ds)
    return list(by_uid.values())


def choose_series(series: list[_Series], source: _Source) -> tuple[_Series, list[str]]:
    """The CT series with the most slices (else the largest image series, with a warning); warnings name the
    others. InputError when there is no DICOM file or no image series."""
    if not series:
        raise InputError(source.label, f"the {source.kind} holds no DICOM files"
                                       + ("" if source.kind == ZIP_KIND else " (and is not a NIfTI file)"))
    images = [s for s in series if s.is_image]
    if not images:
        raise InputError(source.label, f"the {source.kind} holds no DICOM image series (only "
                                       + ", ".join(s.describe() for s in series) + ")")
    chosen = max(images, key=lambda s: (s.is_ct_volume, not s.multiframe, s.n_slices))
    said = []
    others = [s for s in series if s is not chosen]
    if others:
        said.append(f"{source.label} holds {len(series)} DICOM series: segmented {chosen.describe()}, not "
                        + ", ".join(s.describe() for s in others) + "; put each series in its own folder to segment it")
    if not chosen.is_ct_volume:
        said.append(f"{source.label}: no CT series with at least {MIN_SLICES} slices; segmented "
                        f"{chosen.describe()}; the CT model's output is meaningless for other images")
    return chosen, said


# ---------------------------------------------------------------------------------------------
# checking the chosen series
# ---------------------------------------------------------------------------------------------
def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _check_pixel_data(ds, source: _Source) -> None:
    """The deferred PixelData element must be complete: as long as Rows x Columns x samples x bits says, and
    inside the file (a truncated slice file is caught here, before any conversion)."""
    path = Path(ds.filename)
    name = source.name(path)
    element = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    if element is None:
        raise InputError(source.label, f"{name} in the {source.kind} holds no pixel data; truncated or corrupt file")
    length = int(getattr(element, "length", 0) or 0)
    if length == 0xFFFFFFFF:  # encapsulated (compressed): decoding will tell
        return
    expected = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("SamplesPerPixel", 1) or 1)
                * int(ds.get("BitsAllocated", 16) or 16) // 8 * int(ds.get("NumberOfFrames", 1) or 1))
    end = getattr(element, "value_tell", None)
    size = path.stat().st_size
    if length < expected:
        raise InputError(source.label, f"{name} in the {source.kind} has {length} bytes of pixel data, "
                                       f"{expected} expected ({ds.get('Rows')}x{ds.get('Columns')} pixels); corrupt file")
    if end is not None and int(end) + length > size:
        raise InputError(source.label, f"{name} in the {source.kind} is truncated: it ends after "
                                       f"{max(size - int(end), 0)} of its {length} bytes of pixel data")


def _drop_localizers(series: _Series) -> tuple[list, list[str]]:
    """The slices dicom2nifti keeps: no LOCALIZER image type, and (when orientations differ) only orientations
    with at least MIN_SLICES slices, as its remove_localizers_* do; returns (slices, notes)."""
    kept = [ds for ds in series.datasets if "LOCALIZER" not in _image_type(ds)]
    notes = []
    if len(kept) < len(series.datasets):
        notes.append(f"left out {len(series.datasets) - len(kept)} localizer slice(s) of the series")
    groups: list[list] = []
    for ds in kept:
        iop = np.asarray(ds.get("ImageOrientationPatient", [np.nan] * 6), dtype=np.float64)
        for g in groups:
            if np.allclose(iop, np.asarray(g[0].ImageOrientationPatient, dtype=np.float64), atol=ORIENTATION_ATOL):
                g.append(ds)
                break
        else:
            groups.append([ds])
    if len(groups) > 1:
        big = [g for g in groups if len(g) >= MIN_SLICES]
        dropped = sum(len(g) for g in groups) - sum(len(g) for g in big)
        if dropped:
            notes.append(f"left out {dropped} slice(s) in another orientation (localizer)")
        kept = [ds for g in big for ds in g]
    return kept, notes


def check_series(slices: list, source: _Source) -> None:
    """InputError (one line) unless ``slices`` (single-frame datasets of one series) form a regular 3D grid:
    same size, pixel spacing and orientation; positions along the slice normal unique and evenly spaced; no
    in-plane drift (gantry tilt); every file's pixel data complete."""
    where, kind = source.label, source.kind
    first = slices[0]
    for ds in slices:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                        "InstanceNumber"):
            if ds.get(keyword, None) in (None, ""):
                raise InputError(where, f"{source.name(Path(ds.filename))} in the {kind} lacks {keyword}; "
                                        "cannot place the slice")
        _check_pixel_data(ds, source)
    if len(slices) < MIN_SLICES:
        raise InputError(where, f"the series has only {len(slices)} slice(s); at least {MIN_SLICES} are needed for "
                                "a volume (a scout/localizer?)")
    size0 = (int(first.Rows), int(first.Columns))
    pix0 = np.asarray(first.PixelSpacing, dtype=np.float64)
    iop0 = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    for ds in slices[1:]:
        name = source.name(Path(ds.filename))
        if (int(ds.Rows), int(ds.Columns)) != size0:
            raise InputError(where, f"slices differ in size: {size0[0]}x{size0[1]} pixels in "
                                    f"{source.name(Path(first.filename))}, {ds.Rows}x{ds.Columns} in {name}")
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=np.float64), pix0, rtol=1e-3, atol=1e-4):
            raise InputError(where, f"slices differ in pixel spacing: {_fmt(pix0)} mm in "
                                    f"{source.name(Path(first.filename))}, {_fmt(ds.PixelSpacing)} mm in {name}")
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop0, atol=ORIENTATION_ATOL):
            raise InputError(where, f"slices differ in orientation: {_fmt(iop0)} in "
                                    f"{source.name(Path(first.filename))}, {_fmt(ds.ImageOrientationPatient)} in {name}")
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise InputError(where, f"ImageOrientationPatient {_fmt(iop0)} is not two orthogonal unit vectors")
    _check_positions(slices, normal, source)


def _check_positions(slices: list, normal: np.ndarray, source: _Source) -> None:
    """Unique, evenly spaced positions along ``normal``; no in-plane drift. Positions z in mm along the normal
    (for an axial series: the patient's z, DICOM LPS, as in ImagePositionPatient)."""
    where = source.label
    pos = np.asarray([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in slices])
    z = pos @ normal
    order = np.argsort(z, kind="stable")
    z, pos = z[order], pos[order]
    names = [source.name(Path(slices[i].filename)) for i in order]
    steps = np.diff(z)
    extent = float(z[-1] - z[0])
    typical = float(np.median(steps))
    tol = max(SPACING_RTOL * abs(typical), POSITION_ATOL_MM)
    same = np.flatnonzero(steps <= tol)
    if same.size:
        i = int(same[0])
        raise InputError(where, f"duplicated slice: {names[i]} and {names[i + 1]} lie at the same position "
                                f"z={z[i]:.2f} mm ({same.size} duplicate(s) in the series)")
    odd = np.flatnonzero(np.abs(steps - typical) > tol)
    if odd.size:
        lo, hi = float(steps.min()), float(steps.max())
        ratio = steps[odd] / typical
        if odd.size < steps.size / 2 and np.all(np.round(ratio) >= 2) and \
                np.all(np.abs(ratio - np.round(ratio)) * typical <= tol):
            i = int(odd[0])
            hint = f"a missing slice between z={z[i]:.2f} and z={z[i + 1]:.2f} mm?"
        else:
            changes = np.flatnonzero(np.abs(np.diff(steps)) > tol)
            if changes.size:
                k = int(changes[0]) + 1
                hint = f"it changes from {steps[k - 1]:.4g} to {steps[k]:.4g} mm at z={z[k]:.2f} mm"
            else:  # a gradual drift
                k = int(odd[0])
                hint = f"{steps[k]:.4g} mm between z={z[k]:.2f} and z={z[k + 1]:.2f} mm, {typical:.4g} mm typical"
        raise InputError(where, f"slice spacing varies from {lo:.4g} to {hi:.4g} mm ({hint}); the slices do not "
                                "form a regular grid")
    inplane = (pos - pos[0]) - np.outer(z - z[0], normal)  # each slice's offset across the normal, mm
    drift = np.linalg.norm(inplane, axis=1)
    limit = max(SPACING_RTOL * extent, POSITION_ATOL_MM)
    if float(drift.max()) > limit:
        expected = np.outer((z - z[0]) / extent, inplane[-1])  # a tilt: offsets grow linearly with z
        if float(np.linalg.norm(inplane - expected, axis=1).max()) <= limit:
            angle = float(np.degrees(np.arctan2(float(drift[-1]), extent)))
            what = f"gantry tilt of {angle:.1f}° (slice positions move {float(drift[-1]):.2f} mm sideways over " \
                   f"{extent:.1f} mm)"
        else:
            what = f"slice positions are shifted sideways by up to {float(drift.max()):.2f} mm (not on one line)"
        raise InputError(where, f"{what}; tilted or sheared series are not supported, resample it to an untilted "
                                "grid first")


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


def convert(slices: list, source: _Source) -> nib.Nifti1Image:
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
            code = _first_line(exc)
            raise InputError(source.label, f"dicom2nifti (the official tool's converter) refuses the series: "
                                           f"{DICOM2NIFTI_CODES.get(code, code)} ({code})") from exc
        except MemoryError:
            raise InputError(source.label, "not enough memory to convert the DICOM series") from None
        except OSError as exc:  # a slice file gone, or the temporary folder full
            raise InputError(source.label, f"I/O error while converting the DICOM series ({type(exc).__name__}: "
                                           f"{exc.strerror or _first_line(exc)})") from exc
        except Exception as exc:  # pydicom decoders and dicom2nifti raise many types for bad pixel data
            raise InputError(source.label, f"cannot convert the DICOM series ({type(exc).__name__}: "
                                           f"{_first_line(exc)}); corrupt or unsupported pixel data?") from exc
        loaded = nib.load(str(out), mmap=False)
        data = np.asanyarray(loaded.dataobj)
        image = nib.Nifti1Image(data, loaded.affine, loaded.header)
    if data.ndim != 3:
        raise InputError(source.label, f"dicom2nifti reads the series as a {data.ndim}D image (shape "
                                       f"{'x'.join(map(str, data.shape))}): the InstanceNumber order does not follow "
                                       "the slice positions, or the folder mixes acquisitions")
    return image


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns (Python warnings and its logger) about invalid values as it decodes them, lazily; a
    corrupt file is reported by our one-line InputError instead."""
    with warnings.catch_warnings(), _quiet_logger("pydicom"):
        warnings.simplefilter("ignore", UserWarning)
        yield


def load_series(source: _Source, recursive: bool) -> nib.Nifti1Image:
    """Read, choose, check and convert the series under ``source``; warnings in ``image.extra["warnings"]``."""
    with _quiet_pydicom():
        return _load_series(source, recursive)


def _load_series(source: _Source, recursive: bool) -> nib.Nifti1Image:
    chosen, said = choose_series(read_series(source, recursive), source)
    if chosen.multiframe:
        raise InputError(source.label, f"{chosen.describe()} is multi-frame (enhanced) DICOM, which is not "
                                       "supported; export it as one file per slice")
    slices, notes = _drop_localizers(chosen)
    if not slices:
        raise InputError(source.label, f"{chosen.describe()} holds only localizer slices; no volume to segment")
    check_series(slices, source)
    image = convert(slices, source)
    image.extra["warnings"] = said + [f"{source.label}: {n}" for n in notes]
    return image


def load_dicom_folder(folder: str | Path) -> nib.Nifti1Image:
    """The series in ``folder`` (its files only, any names; subfolders are series of their own), as the
    official tool's dicom2nifti grid: (x, y, z) array, RAS+ affine in mm (LAS for an axial series)."""
    folder = Path(folder)
    return load_series(_Source(folder, folder, FOLDER_KIND), recursive=False)


# ---------------------------------------------------------------------------------------------
# zip archives
# ---------------------------------------------------------------------------------------------
def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member must not be extracted (unsafe path, link or special file, encrypted), or None."""
    from common.download import safe_member_name  # imports requests: only when a zip is read

    try:
        safe_member_name(info.filename)
    except DownloadError:
        return f"member {info.filename!r} would be written outside the extraction folder (path traversal)"
    mode = (info.external_attr >> 16) & 0o170000
    if mode and mode not in (stat.S_IFREG, stat.S_IFDIR):
        what = "a symbolic link" if mode == stat.S_IFLNK else "a special file"
        return f"member {info.filename!r} is {what}"
    if info.flag_bits & 0x1:
        return f"member {info.filename!r} is encrypted"
    return None


def extract_zip(path: Path, dest: Path) -> None:
    """Extract the zip ``path`` into the empty folder ``dest`` safely: the whole archive is refused (InputError,
    one line) for a member with an absolute or '..' path, a link or special file, an encrypted member, or a
    declared uncompressed size above the free disk space at ``dest`` or the available memory."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise InputError(path, f"corrupt or unreadable zip archive ({_first_line(exc)})") from exc
    with zf:
        infos = zf.infolist()
        for info in infos:
            problem = _member_problem(info)
            if problem:
                raise InputError(path, f"zip archive refused: {problem}")
        declared = sum(i.file_size for i in infos if not i.is_dir())
        free_disk = shutil.disk_usage(dest).free
        if declared > free_disk:
            raise InputError(path, f"zip archive declares {fmt_bytes(declared)} uncompressed, only "
                                   f"{fmt_bytes(free_disk)} free on disk in {dest.parent}")
        available = available_memory_bytes()
        if available is not None and declared > available:
            raise InputError(path, f"zip archive declares {fmt_bytes(declared)} uncompressed, "
                                   f"{fmt_bytes(available)} of memory available; the series would not fit")
        try:
            for info in infos:
                target = dest.joinpath(*info.filename.replace("\\", "/").split("/"))
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_member(zf, info, target, path)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
            raise InputError(path, f"corrupt or unreadable zip archive ({type(exc).__name__}: "
                                   f"{_first_line(exc)})") from exc
        except OSError as exc:
            raise InputError(path, f"cannot extract the zip archive into {dest.parent} "
                                   f"({exc.strerror or _first_line(exc)})") from exc


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, path: Path) -> None:
    """One member to ``target``; zipfile itself stops at the member's declared size (and checks its CRC), so the
    total written is bounded by the sizes checked before extraction."""
    if target.exists():
        raise InputError(path, f"zip archive refused: member {info.filename!r} appears twice")
    with zf.open(info) as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, ZIP_CHUNK_BYTES)


def load_dicom_zip(path: str | Path) -> nib.Nifti1Image:
    """The DICOM series in a zip (at its top or in sub-folders), extracted to a temporary folder that is always
    removed; as ``load_dicom_folder``. InputError for an unsafe or oversized zip, or one without a DICOM series."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="ts-bench-zip-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp) / "extracted"
        root.mkdir()
        extract_zip(path, root)
        return load_series(_Source(path, root, ZIP_KIND), recursive=True)
