"""Atomic file writes: write to a temporary file in the target folder, fsync, then rename.

A crash or kill at any point leaves either the old file or the complete new one, never a
half-written file (os.replace is atomic on POSIX within one filesystem).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    ``suffix`` is appended to the temporary name (e.g. ".nii.gz" so that libraries that pick a
    format from the extension do the right thing). On error the temporary file is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", suffix=suffix, dir=target.parent)
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


def atomic_save_nifti(img: nib.Nifti1Image, target: str | Path) -> Path:
    """Save a NIfTI image atomically (gzip chosen from the target's .nii.gz ending)."""
    target = Path(target)
    suffix = ".nii.gz" if target.name.endswith(".nii.gz") else ".nii"
    with atomic_path(target, suffix=suffix) as tmp:
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
    stale = sorted(target.parent.glob(TMP_PREFIX + target.name + ".*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
