"""The header guard: a NIfTI file must hold the voxel data its header declares, and they must fit in RAM,
checked before anything reads (allocates) them. Sizes are bytes."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib

from common.core.errors import InputError
from common.core.machine import available_memory_bytes
from common.core.text import fmt_bytes

# Deflate (gzip) cannot compress better than ~1032:1 (a 258-byte match per ~2 bits), so a .nii.gz of C bytes
# never holds more than C * 1032 bytes; a header declaring more is lying, whatever the stream says.
DEFLATE_MAX_RATIO = 1032
GZIP_CHUNK_BYTES = 1 << 20  # streaming verification reads (and discards) at most this much at a time


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
