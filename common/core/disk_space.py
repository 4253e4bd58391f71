"""Free space on the output's filesystem, checked before the work against an estimate of what the outputs need,
so that a full disk is refused in one line at the start rather than met half-way (the staged writes of
common.core.staging still keep a run that fails later from leaving anything half-written)."""
from __future__ import annotations

import shutil
from pathlib import Path

from common.core.errors import InputError
from common.core.text import fmt_bytes


def free_bytes(folder: str | Path) -> int:
    """Bytes free to this user on the filesystem of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(folder: str | Path, need_bytes: int, what: str) -> None:
    """Raise InputError (one line naming ``folder``) when less than ``need_bytes`` is free there; ``what`` says
    what needs it, e.g. "the 117 masks (at least)"."""
    free = free_bytes(folder)
    if free < need_bytes:
        raise InputError(folder, f"not enough free space: {what} need {fmt_bytes(need_bytes)}, "
                                 f"{fmt_bytes(free)} free; free some space or write elsewhere")
