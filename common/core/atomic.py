"""Atomic file writes: write to a temporary file in the target folder, fsync, then rename.

A crash or kill at any point leaves either the old file or the complete new one, never a
half-written file (os.replace is atomic on POSIX within one filesystem).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

TMP_PREFIX = ".tmp-"
RANDOM_CHARS = 8  # tempfile's random part: 8 of [a-z0-9_]
DEFAULT_NAME_MAX = 255  # bytes per file name on Linux/macOS filesystems (ext4, xfs, btrfs, tmpfs, APFS)


def name_max(folder: str | Path) -> int:
    """The longest file name (bytes) the filesystem of ``folder`` (or of its nearest existing parent) allows."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return DEFAULT_NAME_MAX


def name_too_long(path: str | Path) -> str | None:
    """Why ``path``'s file name cannot be created on its filesystem (one line naming it), or None."""
    path = Path(path)
    limit, n = name_max(path.parent), len(os.fsencode(path.name))
    if n <= limit:
        return None
    shown = path.name if len(path.name) <= 60 else path.name[:40] + "..." + path.name[-16:]
    return (f"{path.parent / shown}: output file name of {n} bytes, over the {limit}-byte limit of its "
            "filesystem; shorten the input's name")


def temp_prefix(name: str, folder: str | Path, suffix: str = "") -> str:
    """The prefix of the temporary names of ``name`` in ``folder``: ``.tmp-<name>.``, or, where that with the
    random part and ``suffix`` would exceed the filesystem's file-name limit, ``.tmp-<start of name>~<hash>.``
    (a short hash of the full name keeps temporary names of different targets apart). A temporary name is
    therefore never longer than the limit whenever the final name fits."""
    prefix = f"{TMP_PREFIX}{name}."
    room = name_max(folder) - RANDOM_CHARS - len(os.fsencode(suffix))
    if len(os.fsencode(prefix)) <= room:
        return prefix
    tag = "~" + hashlib.sha1(os.fsencode(name)).hexdigest()[:10] + "."
    keep = os.fsencode(name)[: max(0, room - len(TMP_PREFIX) - len(tag))].decode("utf-8", "ignore")
    return f"{TMP_PREFIX}{keep}{tag}"


def is_temp_of(entry: str, prefix: str, suffix: str = "") -> bool:
    """True if ``entry`` is a temporary name made from ``prefix`` (temp_prefix) and ``suffix``: exactly the
    random part between them, so that target "a" never claims the temporary files of target "a.b"."""
    return re.fullmatch(re.escape(prefix) + f"[a-z0-9_]{{{RANDOM_CHARS}}}" + re.escape(suffix), entry) is not None


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    ``suffix`` is appended to the temporary name (e.g. ".nii.gz" so that libraries that pick a
    format from the extension do the right thing). On error the temporary file is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target.name, target.parent, suffix), suffix=suffix,
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically; return the target path."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically; return the target path."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(target: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Serialise ``obj`` (numpy scalars/arrays and Paths allowed) to JSON at ``target`` atomically."""
    text = json.dumps(obj, indent=indent, default=_json_default, allow_nan=False)
    return atomic_write_text(target, text + "\n")


GZIP_LEVEL = 1  # nibabel's own default level for .nii.gz (nibabel.openers.Opener.default_compresslevel)


def _save_nifti_gz_fast(img: nib.Nifti1Image, path: Path) -> bool:
    """Write ``img`` to ``path`` as a standard gzip-compressed single-file NIfTI through ISA-L's igzip
    (python-isal), or return False where it is not installed. Written by hand because nibabel deflates
    with zlib only: the same gzip stream format (RFC 1952, any gzip/zlib reader, nibabel and SimpleITK
    included, reads it), at about 10x zlib's speed on label masks (a 512x512x200 uint8 mask: 10 ms
    against 102 ms). The header and voxel bytes are exactly what nib.save writes (to_file_map)."""
    try:
        from isal import igzip
    except ImportError:
        return False
    from nibabel.fileholders import FileHolder

    with open(path, "wb") as raw, igzip.IGzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL,
                                                  mtime=0) as fo:
        img.to_file_map({"image": FileHolder(fileobj=fo)})
    return True


def atomic_save_nifti(img: nib.Nifti1Image, target: str | Path) -> Path:
    """Save a NIfTI image atomically (gzip chosen from the target's .nii.gz ending; deflated by ISA-L
    where python-isal is installed, by nibabel's zlib otherwise: the same standard file either way)."""
    target = Path(target)
    suffix = ".nii.gz" if target.name.endswith(".nii.gz") else ".nii"
    single_file = isinstance(img, nib.Nifti1Image)  # Nifti2Image is a subclass; Nifti1Pair is not
    with atomic_path(target, suffix=suffix) as tmp:
        if not (suffix == ".nii.gz" and single_file and _save_nifti_gz_fast(img, tmp)):
            nib.save(img, str(tmp))
    return target


def leftover_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files of interrupted atomic writes under ``folder`` (recursive)."""
    return sorted(Path(folder).rglob(TMP_PREFIX + "*"))


def remove_stale_temp_files(target: str | Path) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes of ``target`` left beside it (a process
    killed mid-write); return them. Call it only where no other process can be writing ``target`` (e.g.
    under the scan's lock), since a live write's temporary file looks the same."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    stale = []
    for p in sorted(target.parent.iterdir()):
        if p.name.startswith(TMP_PREFIX) and p.is_file() and any(
                is_temp_of(p.name, temp_prefix(target.name, target.parent, sfx), sfx) for sfx in _SUFFIXES):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


_SUFFIXES = ("", ".nii.gz", ".nii", ".json", ".png", ".onnx")  # what atomic_path's callers append
