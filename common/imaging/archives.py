"""Safe extraction of the scans we need from the downloaded archives (MSD Task09 tar, Learn2Reg zip).

Only the needed members are copied, each written atomically; archive paths are never followed (no absolute
paths or '..', no links, devices or folders). Every failure is a ``DownloadError`` whose message is one line.
"""
from __future__ import annotations

import re
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.core.atomic import atomic_path
from common.core.errors import DownloadError, one_line

CHUNK = 1 << 20


def safe_member_name(name: str) -> PurePosixPath:
    """An archive member name as a relative POSIX path; DownloadError for absolute paths or '..'."""
    norm = name.replace("\\", "/")
    path = PurePosixPath(norm)
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in path.parts:
        raise DownloadError(f"archive member {name!r} has an unsafe path (absolute or '..'); refusing to extract it")
    return path


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _is_junk(path: PurePosixPath) -> bool:
    return path.name.startswith(".") or "__MACOSX" in path.parts


@dataclass
class ExtractResult:
    written: list[Path]
    skipped: list[Path]  # already present (not overwritten without force)


def _copy_member(read: Callable[[], object], target: Path, force: bool, result: ExtractResult) -> None:
    if target.exists() and not force:
        result.skipped.append(target)
        return
    with atomic_path(target, suffix=".nii.gz") as tmp:
        with read() as src, open(tmp, "wb") as dst:  # type: ignore[attr-defined]
            shutil.copyfileobj(src, dst, CHUNK)
    result.written.append(target)


def spleen_members(names: Iterable[str]) -> list[str]:
    """Members ``*/imagesTr/*.nii.gz`` of the MSD tar (macOS '._' files skipped), natural order."""
    out = []
    for name in names:
        path = safe_member_name(name)
        if _is_junk(path) or not path.name.endswith(".nii.gz"):
            continue
        if len(path.parts) >= 2 and path.parts[-2] == "imagesTr":
            out.append(name)
    return sorted(out, key=lambda n: _natural_key(PurePosixPath(n).name))


def extract_spleen(tar_path: str | Path, out_dir: str | Path, max_samples: int | None = 5,
                   force: bool = False) -> ExtractResult:
    """Copy the first ``max_samples`` imagesTr scans of the Task09 tar to ``out_dir/<name>.nii.gz``."""
    out_dir = Path(out_dir)
    result = ExtractResult([], [])
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DownloadError(f"{tar_path}: corrupt or unreadable tar archive ({one_line(exc)}); "
                            "delete it and re-run to download again") from exc
    try:
        with tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}  # no links, devices, dirs
            chosen = spleen_members(members)
            if max_samples is not None:
                chosen = chosen[: max(0, int(max_samples))]
            if not chosen:
                raise DownloadError(f"{tar_path}: no imagesTr/*.nii.gz scans in the archive")
            for name in chosen:
                target = out_dir / PurePosixPath(name).name
                _copy_member(lambda n=name: tar.extractfile(members[n]), target, force, result)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DownloadError(f"{tar_path}: corrupt or unreadable tar archive ({one_line(exc)}); "
                            "delete it and re-run to download again") from exc
    return result


LEARN2REG_PATTERN = re.compile(r"^(?P<case>case_\d+)_(?P<phase>exp|insp)\.nii\.gz$", re.IGNORECASE)


def learn2reg_pairs(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """(case, exp member, insp member) for every complete pair of scans (lung masks excluded), natural order."""
    found: dict[str, dict[str, str]] = {}
    for name in names:
        path = safe_member_name(name)
        if _is_junk(path) or "lungmasks" in (p.lower() for p in path.parts):
            continue
        m = LEARN2REG_PATTERN.match(path.name)
        if m:
            found.setdefault(m.group("case").lower(), {})[m.group("phase").lower()] = name
    return [(case, d["exp"], d["insp"]) for case, d in sorted(found.items(), key=lambda kv: _natural_key(kv[0]))
            if "exp" in d and "insp" in d]


def extract_learn2reg(zip_path: str | Path, out_dir: str | Path, max_pairs: int | None = 5,
                      force: bool = False) -> ExtractResult:
    """Copy the first ``max_pairs`` exp/insp scan pairs of the Learn2Reg zip to ``out_dir`` (flat)."""
    out_dir = Path(out_dir)
    result = ExtractResult([], [])
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise DownloadError(f"{zip_path}: corrupt or unreadable zip archive ({one_line(exc)}); "
                            "delete it and re-run to download again") from exc
    try:
        with zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            pairs = learn2reg_pairs(names)
            if max_pairs is not None:
                pairs = pairs[: max(0, int(max_pairs))]
            if not pairs:
                raise DownloadError(f"{zip_path}: no case_XXX_exp/insp .nii.gz pairs in the archive")
            for _case, exp, insp in pairs:
                for name in (exp, insp):
                    target = out_dir / PurePosixPath(name).name
                    _copy_member(lambda n=name: zf.open(n), target, force, result)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise DownloadError(f"{zip_path}: corrupt or unreadable zip archive ({one_line(exc)}); "
                            "delete it and re-run to download again") from exc
    return result
