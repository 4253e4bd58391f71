"""Scan I/O at the edge of the pipeline: NIfTI files, DICOM series folders and zips of them -> nibabel images.

Arrays are nibabel-ordered (x, y, z) voxel axes; affines map voxel indices to world mm, RAS+.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common.core.atomic import atomic_save_nifti
from common.core.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Deflate (gzip) cannot compress better than ~1032:1 (a 258-byte match per ~2 bits), so a .nii.gz of C bytes
# never holds more than C * 1032 bytes; a header declaring more is lying, whatever the stream says.
DEFLATE_MAX_RATIO = 1032
GZIP_CHUNK_BYTES = 1 << 20  # streaming verification reads (and discards) at most this much at a time


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def scan_id(path: str | Path) -> str:
    """File name without .nii/.nii.gz/.zip (or the folder name of a DICOM series)."""
    name = Path(path).name
    for suf in (".nii.gz", ".nii", ".zip"):
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


def _load_dicom_series(path: Path) -> nib.Nifti1Image:
    """The DICOM series in a folder (its files, any names) or a zip (common.imaging.dicom): the image the official
    tool's dicom2nifti conversion gives, (x, y, z) array in HU, RAS+ affine in mm (LAS for an axial series).

    Several series: the CT series with the most slices, the others named in ``image.extra["warnings"]``
    (load_scan reports them). A missing/duplicated/unevenly spaced slice, gantry tilt or a truncated file is
    an InputError (one line), never a silently wrong grid.
    """
    from common.imaging.dicom import load_dicom_folder, load_dicom_zip
    from common.imaging.dicom_series import is_zip_path

    return load_dicom_zip(path) if path.is_file() and is_zip_path(path) else load_dicom_folder(path)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages via os.sysconf, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def fmt_bytes(n: int | float) -> str:
    """A byte count as B, KiB, MiB or GiB with one decimal."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _gzip_isize(path: Path) -> int | None:
    """The gzip trailer's ISIZE: uncompressed length mod 2**32 of the last member (None if unreadable)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            return int.from_bytes(fh.read(4), "little")
    except OSError:
        return None


def _gzip_holds(path: Path, needed: int) -> tuple[int, str | None]:
    """Decompress ``path`` in bounded chunks until ``needed`` bytes came out; return (bytes seen, error or None).

    Memory stays at about GZIP_CHUNK_BYTES whatever the file claims; output is discarded.
    """
    seen = 0
    try:
        with gzip.open(path, "rb") as fh:
            while seen < needed:
                chunk = fh.read(min(GZIP_CHUNK_BYTES, needed - seen))
                if not chunk:
                    break
                seen += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return seen, f"{type(exc).__name__}: {reason}"
    return seen, None


def declared_bytes(img: nib.spatialimages.SpatialImage) -> tuple[int, int]:
    """(data offset, voxel data size) in bytes that a lazily loaded image's on-disk header declares."""
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    # A loaded image's header is a copy with vox_offset reset to 0; the array proxy keeps the on-disk offset.
    offset = getattr(img.dataobj, "offset", None)
    offset = int(header.get_data_offset() if offset is None else offset)
    n_vox = 1
    for s in shape:
        n_vox *= max(s, 0)  # python ints: no overflow
    return offset, n_vox * int(header.get_data_dtype().itemsize)


# Runs on the header only (nib.load is lazy), so before anything touches dataobj/get_fdata: without it, a 4 KiB
# .nii claiming 2000x2000x2000 int16 voxels makes nibabel allocate 15 GiB before it notices the file is short.
# Plain .nii: exact (file size). .nii.gz: the deflate ratio bound, the memory check, then the gzip trailer's ISIZE
# (exact below 4 GiB for a single-member file, so a truncated file matches it only by 2**-32 chance); when it
# does not match, the stream is decompressed in bounded chunks up to the declared length (memory ~1 MiB).
# ``available`` is free RAM in bytes (default: this machine's MemAvailable).
def check_declared_size(path: str | Path, img: nib.spatialimages.SpatialImage, available: int | None = None) -> int:
    """InputError unless the file holds the data its header declares and it fits in RAM; returns its size in bytes."""
    path = Path(path)
    header = img.header
    offset, data_bytes = declared_bytes(img)
    needed = offset + data_bytes
    dims = "x".join(str(int(s)) for s in header.get_data_shape())
    what = f"header declares {dims} {header.get_data_dtype().name} voxels ({fmt_bytes(data_bytes)})"
    try:
        file_bytes = path.stat().st_size
    except OSError as exc:
        raise InputError(path, f"cannot read the file ({exc.strerror or exc})") from None
    compressed = str(path).lower().endswith(".gz")
    if not compressed and file_bytes < needed:
        raise InputError(path, f"{what} but the file holds {fmt_bytes(max(file_bytes - offset, 0))} of data: "
                               "truncated or corrupt file or header")
    if compressed and needed > file_bytes * DEFLATE_MAX_RATIO:
        raise InputError(path, f"{what} but the {fmt_bytes(file_bytes)} compressed file can hold at most "
                               f"{fmt_bytes(file_bytes * DEFLATE_MAX_RATIO)} (gzip ratio <= {DEFLATE_MAX_RATIO}:1): "
                               "truncated or corrupt file or header")
    available = available_memory_bytes() if available is None else available
    if available is not None and data_bytes > available:
        raise InputError(path, f"{what}: loading needs at least {fmt_bytes(data_bytes)} of memory, "
                               f"{fmt_bytes(available)} available; crop the scan or use a machine with more memory")
    if compressed and not (needed < 2**32 and _gzip_isize(path) == needed):
        seen, error = _gzip_holds(path, needed)
        if error is not None:
            raise InputError(path, f"compressed data are truncated or corrupt after {fmt_bytes(seen)} of the "
                                   f"{fmt_bytes(needed)} the header declares ({error}); re-download or re-export "
                                   "the file")
        if seen < needed:
            raise InputError(path, f"{what} but the compressed stream holds {fmt_bytes(max(seen - offset, 0))} of "
                                   "data: truncated or corrupt file or header")
    return data_bytes


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


def save_labels(labels: np.ndarray, affine: np.ndarray, target: str | Path,
                header: nib.Nifti1Header | None = None) -> Path:
    """Save an (x, y, z) label map as uint8 (uint16 if needed) NIfTI atomically."""
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    img = nib.Nifti1Image(np.asfortranarray(labels, dtype=dtype), affine, header)  # NIfTI order: no reordering on save
    img.set_data_dtype(dtype)
    return atomic_save_nifti(img, target)
