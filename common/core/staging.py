"""Output sets replaced as a whole or not at all.

A run writes its outputs into a staging folder beside them; only once every file is written are they put in
place, by renames within one filesystem (no data copied, so a full disk cannot strike then). On any failure the
staging folder is removed, and what was there before is untouched.

- ``StagedFolder``: the target is a folder of outputs (totalseg-fast's mask folder, or <o>/<scan id>/). The new
  folder replaces the old one in one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two
  renames, with the old folder put back if the second fails). Entries of the old folder that the run does not
  own (a user's own files) are moved over into the new one; the old outputs go.
- ``StagedFiles``: the targets are files in a folder shared with other scans (06's ``<id>_seg.nii.gz``,
  ``<id>_passport.json``, ``<id>_run.json``). They are written into a staging folder, then renamed into place in
  the order they were staged (06 stages its run record last).

Callers serialise runs on one target with a lock (common.core.locks); staging folders of a killed run are
recognised by name (common.core.atomic.temp_prefix) and removed under that lock.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.core.atomic import TMP_PREFIX, is_temp_of, temp_prefix

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 with RENAME_EXCHANGE). False where the C library,
    the kernel or the filesystem cannot (NFS, old kernels, macOS): the caller then falls back to two renames."""
    # Python's os module has no renameat2 and no well-kept library wraps it; one ctypes call to the C library
    # is the whole of it.
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _new_folder_beside(target: Path) -> Path:
    """A new, empty hidden folder beside ``target`` (named by temp_prefix), with the usual permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name, target.parent), dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)  # mkdtemp makes 0700
    return path


def _fsync_folder(folder: Path) -> None:
    """Make ``folder``'s entries durable (renames into it), where the OS allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StagedFolder:
    """``with StagedFolder(target, owned) as staging:`` write the new outputs into ``staging``; on success they
    replace the folder ``target`` as a whole, on an exception nothing of them remains.

    ``owned(name)`` is True for the names of ``target``'s entries that belong to the output set (all class masks
    the tool can write, its statistics, preview, ...): those of an earlier run are dropped with the old folder,
    whether or not this run writes them again. Other entries are the user's and are kept. A symbolic link
    ``target`` is followed: the folder it points to is replaced."""

    def __init__(self, target: str | Path, owned: Callable[[str], bool]):
        target = Path(target)
        self.target = target.resolve() if target.is_symlink() else target
        self.owned = owned
        self.path: Path | None = None

    def __enter__(self) -> Path:
        if self.target.exists() and not self.target.is_dir():
            raise OSError(errno.ENOTDIR, f"{self.target}: exists and is not a folder")
        self.path = _new_folder_beside(self.target)
        return self.path

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False

    def discard(self) -> None:
        """Remove the staging folder and everything in it."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def commit(self) -> None:
        """Put the staged folder in place of ``target`` (see the class docstring); the old one is removed."""
        staged, target = self.path, self.target
        assert staged is not None, "commit outside the with block"
        for p in staged.iterdir():
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_folder(staged)
        if not target.exists():
            os.rename(staged, target)
            self.path = None
            _fsync_folder(target.parent)
            return
        if _exchange(staged, target):
            old = staged
        else:  # two renames: target briefly absent, never half-written
            old = _new_folder_beside(target)
            os.rmdir(old)
            os.rename(target, old)
            try:
                os.rename(staged, target)
            except OSError:
                os.rename(old, target)
                raise
        self.path = None
        for entry in sorted(old.iterdir()):
            if not self.owned(entry.name) and not os.path.lexists(target / entry.name):
                os.rename(entry, target / entry.name)  # the user's own file: kept
        _fsync_folder(target.parent)
        shutil.rmtree(old, ignore_errors=True)


class StagedFiles:
    """``with StagedFiles(folder, key) as stage:`` write each output to ``stage.path(name)``; on success they
    are renamed to ``folder/name`` in the order staged, after the files in ``remove_first`` are deleted; on an
    exception nothing of them remains and the files in ``folder`` are untouched. ``key`` names the staging
    folder (a scan id), so that scans sharing ``folder`` never touch each other's staging."""

    def __init__(self, folder: str | Path, key: str, remove_first: tuple[Path, ...] = ()):
        self.folder, self.key, self.remove_first = Path(folder), key, remove_first
        self._names: list[str] = []
        self._staging: Path | None = None

    def __enter__(self) -> StagedFiles:
        self._staging = _new_folder_beside(self.folder / self.key)
        return self

    def path(self, name: str) -> Path:
        """Where to write the output that will become ``folder/name``."""
        assert self._staging is not None, "path() outside the with block"
        if name not in self._names:
            self._names.append(name)
        return self._staging / name

    def __exit__(self, exc_type, exc, tb) -> bool:
        staging, self._staging = self._staging, None
        try:
            if exc_type is None and staging is not None:
                for name in self._names:
                    if (staging / name).exists():
                        with open(staging / name, "rb") as fh:
                            os.fsync(fh.fileno())
                for p in self.remove_first:
                    p.unlink(missing_ok=True)
                for name in self._names:
                    if (staging / name).exists():
                        os.replace(staging / name, self.folder / name)
                _fsync_folder(self.folder)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return False


def remove_stale_staging(target: str | Path, owned: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Remove the staging folders that killed runs left beside ``target`` (call it under the target's lock);
    one message per folder. A staging folder still holding entries ``owned`` rejects (the user's files,
    caught mid-move by a kill) is kept, and said so."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    prefix = temp_prefix(target.name, target.parent)
    messages = []
    for p in sorted(target.parent.iterdir()):
        if not (p.name.startswith(TMP_PREFIX) and p.is_dir() and not p.is_symlink() and is_temp_of(p.name, prefix)):
            continue
        foreign = [e.name for e in p.iterdir() if not owned(e.name)]
        if foreign:
            messages.append(f"kept {p}: left by an interrupted run, it holds files this tool did not write "
                            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})")
            continue
        shutil.rmtree(p, ignore_errors=True)
        messages.append(f"removed {p.name}: left by an interrupted run on {target.name}")
    return messages
