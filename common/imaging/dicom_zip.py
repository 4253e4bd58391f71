"""DICOM input from a zip archive: safe extraction into an empty folder (then read as a folder by common.imaging.dicom)."""
from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from pathlib import Path

from common.core.errors import DownloadError, InputError
from common.core.machine import available_memory_bytes
from common.core.text import fmt_bytes
from common.imaging.archives import safe_member_name
from common.imaging.dicom_series import first_line

ZIP_CHUNK_BYTES = 1 << 20


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member must not be extracted (unsafe path, link or special file, encrypted), or None."""
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
        raise InputError(path, f"corrupt or unreadable zip archive ({first_line(exc)})") from exc
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
                                   f"{first_line(exc)})") from exc
        except OSError as exc:
            raise InputError(path, f"cannot extract the zip archive into {dest.parent} "
                                   f"({exc.strerror or first_line(exc)})") from exc


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, path: Path) -> None:
    """One member to ``target``; zipfile itself stops at the member's declared size (and checks its CRC), so the
    total written is bounded by the sizes checked before extraction."""
    if target.exists():
        raise InputError(path, f"zip archive refused: member {info.filename!r} appears twice")
    with zf.open(info) as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, ZIP_CHUNK_BYTES)
