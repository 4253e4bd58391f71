"""01 --from: import your own scans into ct_data/ - NIfTI files copied, DICOM series (folders or zips) converted.

Each source is named after its path below the --from folder (p1/CT/ -> p1__CT.nii.gz); sources that would
share a scan id are refused, one line each; an existing output is kept when it holds the same scan (same
bytes, or for DICOM the same voxels and affine), and is an error otherwise unless ``force``.
Messages: progress on stdout, ``warning: ``/``error: `` lines on stderr, one line each.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

from common.core.atomic import atomic_path, atomic_save_nifti
from common.core.errors import InputError
from common.imaging.dicom_series import DICOMDIR, DICOMDIR_REASON, import_wording, is_dicom_file, object_kind
from common.imaging.discovery import is_label_file
from common.imaging.labels import same_grid
from common.imaging.scan_paths import is_nifti_path, is_zip_path, scan_id
from common.imaging.validation import load_scan

NAME_JOIN = "__"  # p1/CT/ -> p1__CT.nii.gz: the path below --from, its parts joined
MAX_SKIPPED_SHOWN = 10


def say(msg: str) -> None:
    """One progress line on stdout."""
    print(msg, flush=True)


def warn(msg: str) -> None:
    """One ``warning: `` line on stderr."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class ImportPlan(NamedTuple):
    """What one --from import does: ``items`` (source, target name in OUT); ``refused`` one-line reasons for
    sources that are not imported; ``skipped`` files that are neither NIfTI nor part of a DICOM series;
    ``ignored`` (file, reason) DICOM files that are not images (a CD's DICOMDIR, RTSTRUCT, SR, SEG...)."""

    items: list[tuple[Path, str]]
    refused: list[str]
    skipped: list[Path]
    ignored: tuple[tuple[Path, str], ...] = ()


def _not_an_image(path: Path) -> str | None:
    """Why the DICOM file ``path`` is not imported when it holds no image ("RTSTRUCT (no image data)", "DICOMDIR
    (a CD's index file)"); None for any other file."""
    kind = object_kind(path) if is_dicom_file(path) else None
    if kind is None:
        return None
    name, pixels = kind
    return DICOMDIR_REASON if name == DICOMDIR else f"{name} ({'not an image series' if pixels else 'no image data'})"


def _dicom_series(root: Path, exclude: Path | None) -> dict[Path, list[str]]:
    """Folders under ``root`` (itself included, ``exclude`` and below left out) that hold DICOM series, per GDCM
    (any file names) -> their series UIDs."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    dirs = [root, *_entries(root, exclude, Path.is_dir)]
    dirs = [d for d in dirs if any(f.is_file() and not is_nifti_path(f) for f in d.iterdir())]
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" for every other folder
    try:
        found = {d: list(reader.GetGDCMSeriesIDs(str(d))) for d in dirs}
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    return {d: uids for d, uids in found.items() if uids}


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def _entries(root: Path, exclude: Path | None, kind) -> list[Path]:
    """Sorted entries below ``root`` for which ``kind(path)`` holds; hidden ones (any part of the path below
    ``root`` starting with ".") and ``exclude`` with everything below it are left out."""
    return sorted(p for p in root.rglob("*") if kind(p) and not _inside(p, exclude)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def import_name(item: Path, root: Path) -> str:
    """The file name in OUT of ``item`` (a NIfTI file or DICOM series folder) found under ``root``: its path below
    ``root`` with the parts joined by "__" (p1/ct.nii.gz -> p1__ct.nii.gz, DICOM folder p1/CT -> p1__CT.nii.gz);
    an item directly in ``root`` (or ``root`` itself) keeps its own name. Label maps follow their scan
    (p1/ct_seg.nii.gz -> p1__ct_seg.nii.gz)."""
    parts = list(item.relative_to(root).parts) or [item.name]
    if item.is_dir() or is_zip_path(item):
        parts[-1] = scan_id(parts[-1]) + ".nii.gz"
    return NAME_JOIN.join(parts)


def plan_import(root: Path, exclude: Path | None = None) -> ImportPlan:
    """Find the NIfTI files and DICOM series folders under ``root`` (recursive; hidden entries and ``exclude`` left
    out) and give each a target name. Targets whose scan ids (name without .nii/.nii.gz) are equal ignoring case
    (a.nii and a.nii.gz; folder a/ beside a.nii.gz) would overwrite each other or share one id later on: the first
    (NIfTI files before DICOM folders, each sorted by path) is imported, every later one is refused."""
    if root.is_file():
        if is_zip_path(root):
            return ImportPlan([(root, import_name(root, root.parent))], [], [])
        return ImportPlan([(root, root.name)], [], []) if is_nifti_path(root) else ImportPlan([], [], [root])
    files = _entries(root, exclude, Path.is_file)
    series = _dicom_series(root, exclude)
    niftis = [p for p in files if is_nifti_path(p)]
    zips = [p for p in files if is_zip_path(p)]  # a zipped DICOM series (common.imaging.dicom reads it)
    others = [p for p in files if not is_nifti_path(p) and not is_zip_path(p) and p.parent not in series]
    why = {p: _not_an_image(p) for p in others}
    skipped = [p for p in others if why[p] is None]
    ignored = tuple((p, why[p]) for p in others if why[p] is not None)
    items: list[tuple[Path, str]] = []
    refused: list[str] = []
    owner: dict[str, Path] = {}
    for src in [*niftis, *series, *zips]:
        name = import_name(src, root)
        key = scan_id(name).casefold()
        if key in owner:
            refused.append(f"{src}: not imported: its name {name} gives the same scan id as {owner[key]} "
                           f"({scan_id(name)}); rename or move one of them")
            continue
        owner[key] = src
        items.append((src, name))
    for folder, uids in series.items():
        refused += [f"{folder}: DICOM series {uid} not imported: only the first series of a folder ({uids[0]}) is; "
                    "put each series in its own folder" for uid in uids[1:]]
    return ImportPlan(items, refused, skipped, ignored)


def _same_file_content(a: Path, b: Path) -> bool:
    """True when the two files have the same size and sha256 (False when either cannot be read)."""
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        digests = []
        for p in (a, b):
            with open(p, "rb") as fh:
                digests.append(hashlib.file_digest(fh, "sha256").hexdigest())
    except OSError:
        return False
    return digests[0] == digests[1]


def _same_image(img: nib.Nifti1Image, target: Path) -> bool:
    """True when the NIfTI file ``target`` holds the voxel values (x, y, z) of ``img`` on the same grid
    (common.imaging.labels.same_grid)."""
    try:
        other = nib.load(str(target))
        if not same_grid(other.shape, other.affine, img.shape, img.affine):
            return False
        return bool(np.array_equal(np.asanyarray(other.dataobj), np.asanyarray(img.dataobj)))
    except Exception:  # an unreadable earlier output is not the same scan
        return False


def _differs(target: Path, src: Path) -> str:
    return (f"{target}: exists and holds a different scan than {src} (an earlier import?); not overwritten: "
            "use --force to replace it, or another --out")


def _import_one(src: Path, target: Path, force: bool) -> bool:
    """Import one scan or label map; print what happened in one line. False when it failed or was refused."""
    is_dicom = src.is_dir() or is_zip_path(src)
    if target.exists() and not force and not is_dicom:
        if not _same_file_content(src, target):
            print(f"error: {_differs(target, src)}", file=sys.stderr, flush=True)
            return False
        say(f"  kept existing {target} (same content as {src})")
        return True
    try:  # label maps beside the scans (*_seg, *_labels...) are copied too, without the CT check
        vol, warnings = load_scan(src, modality="ANY" if is_label_file(src) else "CT")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return False
    if target.exists() and not force:  # a DICOM series converted earlier: compare the voxels
        if not _same_image(vol.image, target):
            print(f"error: {_differs(target, src)}", file=sys.stderr, flush=True)
            return False
        say(f"  kept existing {target} (same scan as {src})")
        return True
    for w in warnings:
        warn(import_wording(w))
    if is_dicom:
        atomic_save_nifti(vol.image, target)
    else:
        with atomic_path(target, suffix=".nii.gz" if target.name.endswith(".gz") else ".nii") as tmp:
            shutil.copyfile(src, tmp)
    say(f"  imported {src} -> {target} ({'x'.join(map(str, vol.shape))}, {vol.orientation})")
    return True


def run_import(src: Path, out: Path, force: bool) -> int:
    """Import the scans under ``src`` into ``out``; returns the number of sources failed or refused."""
    if not src.exists():
        raise InputError(src, "folder not found (--from)")
    root, out_dir = src.resolve(), out.resolve()
    if root == out_dir:
        raise InputError(src, "--from and --out are the same folder; import into another folder")
    exclude = src / out_dir.relative_to(root) if _inside(out_dir, root) else None
    if exclude is not None:
        say(f"  not searching the output folder {out} (inside --from)")
    plan = plan_import(src, exclude)
    for path, reason in plan.ignored[:MAX_SKIPPED_SHOWN]:
        say(f"  ignored {path}: {reason}")
    if len(plan.ignored) > MAX_SKIPPED_SHOWN:
        say(f"  ignored {len(plan.ignored) - MAX_SKIPPED_SHOWN} more DICOM files that hold no image")
    for path in plan.skipped[:MAX_SKIPPED_SHOWN]:
        say(f"  skipped {path}: not a NIfTI file (.nii/.nii.gz) or part of a DICOM series")
    if len(plan.skipped) > MAX_SKIPPED_SHOWN:
        say(f"  skipped {len(plan.skipped) - MAX_SKIPPED_SHOWN} more files that are neither NIfTI nor DICOM")
    if not plan.items:
        raise InputError(src, "no NIfTI files (.nii/.nii.gz) or DICOM series found (--from)")
    for line in plan.refused:
        print(f"error: {line}", file=sys.stderr, flush=True)
    failures = len(plan.refused)
    for item, name in plan.items:
        failures += not _import_one(item, out / name, force)
    return failures
