#!/usr/bin/env python
"""Step 01: get CT scans into ct_data/ - download public data sets, or import your own scans.

Examples:
  python 01_download_data.py                         # 5 spleen CTs (MSD Task09) -> ct_data/spleen_*.nii.gz
  python 01_download_data.py --dataset all --max-samples 3
  python 01_download_data.py --from /path/to/scans   # NIfTI files, DICOM series folders and zips, no network
  python 01_download_data.py --realistic             # 0.8x0.8x1.5 mm variants -> ct_data/realistic/
  python 01_download_data.py --clinical              # 512x512x200 and x500 (8 and 16 tiles) -> ct_data/clinical/
  python 01_download_data.py --clinical --clinical-sizes 200,500,1000   # + a whole-body size (32 tiles)

Downloads resume after an interruption (re-run the same command) and are verified before use.
Existing outputs are never overwritten without --force, and no folder is ever wiped.
--from names each scan after its path below DIR (DIR/p1/CT/ -> p1__CT.nii.gz), so that equal file or
folder names in different folders never collide; sources that would still share a scan id are refused.
Exit status: 0 success, 1 on any error or any scan not imported (one line each), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent

from common import download
from common.args import OneLineParser, positive_int, run_script
from common.atomic import atomic_path, atomic_save_nifti
from common.cli import is_label_file
from common.dicom import is_zip_path
from common.errors import DownloadError, InputError
from common.validation import load_scan
from common.variants import (
    CLINICAL_INPLANE,
    CLINICAL_SLICES,
    CLINICAL_SPACING_MM,
    REALISTIC_SPACING_MM,
    clinical_name,
    clinical_variant,
    realistic_variant,
    write_variant,
)
from common.volume import is_nifti_path, scan_id

DEFAULT_OUT = ROOT / "ct_data"
DOWNLOADS_SUBDIR = "downloads"
LEARN2REG_SUBDIR = "learn2reg"
REALISTIC_SUBDIR = "realistic"
CLINICAL_SUBDIR = "clinical"
CLINICAL_SOURCE_NAME = "example_ct.nii.gz"
SHARED_CT = Path(os.environ.get("TS_BENCH_SHARED_CT", ROOT.parent / "shared" / "data" / "ct"))


def say(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="01_download_data.py",
        description=__doc__.split("\n\n")[0],
        epilog="Sources: MSD Task09_Spleen (" + download.SPLEEN.url + ", md5-verified); Learn2Reg lung CT "
               "exp/insp pairs (" + download.LEARN2REG.url + "). Offline? Use --from DIR.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output folder (default: %(default)s); archives are kept in OUT/downloads/")
    p.add_argument("--dataset", choices=("spleen", "learn2reg", "all"), default=None,
                   help="what to download (default: spleen, unless only --from/--realistic/--clinical is given). "
                        "spleen -> OUT/spleen_N.nii.gz; learn2reg -> OUT/learn2reg/case_XXX_{exp,insp}.nii.gz")
    p.add_argument("--max-samples", type=positive_int, default=5, metavar="N",
                   help="number of spleen scans / learn2reg exp-insp pairs to extract (default: %(default)s)")
    p.add_argument("--from", dest="from_dir", type=Path, metavar="DIR",
                   help="import your own scans instead of downloading: NIfTI files (.nii/.nii.gz) are copied, "
                        "DICOM series folders and zips of them are converted to NIfTI on the grid the official tool's dicom2nifti "
                        "conversion gives (LAS for an axial series), so masks line up with its masks; searched "
                        "recursively. "
                        "Each is named after its path below DIR, parts joined by '__' (DIR/p1/ct.nii.gz -> "
                        "OUT/p1__ct.nii.gz, DICOM folder DIR/p1/CT/ -> OUT/p1__CT.nii.gz; directly in DIR: its own "
                        "name; label maps p1/ct_seg.nii.gz follow their scan). Sources that would get the same scan "
                        "id (a.nii and a.nii.gz, folder a/ beside a.nii.gz; case ignored) are refused after the "
                        "first, one line each; an existing output with other content than its source is an error "
                        "unless --force")
    p.add_argument("--realistic", action="store_true",
                   help="write clinical-resolution variants ({:g}x{:g}x{:g} mm, int16) of the scans in OUT "
                        "into OUT/realistic/".format(*REALISTIC_SPACING_MM))
    p.add_argument("--clinical", action="store_true",
                   help="write clinical-size multi-tile scans made from a real CT (default source: "
                        f"OUT/{CLINICAL_SOURCE_NAME}, else $TS_BENCH_SHARED_CT or ../shared/data/ct/"
                        f"{CLINICAL_SOURCE_NAME}) into OUT/{CLINICAL_SUBDIR}/clinical_<X>x<Y>x<Z>.nii.gz: "
                        "resampled in-plane (linear) and padded with air to {0}x{0}, extended along z by "
                        "mirroring, int16".format(CLINICAL_INPLANE))
    p.add_argument("--clinical-sizes", type=_clinical_sizes, metavar="N[,N...]",
                   default=",".join(str(n) for n in CLINICAL_SLICES),
                   help=f"slice counts of the clinical scans ({CLINICAL_INPLANE}x{CLINICAL_INPLANE}xN each; an "
                        "entry may also be a whole shape XxYxZ), e.g. 200,500,1000 adds a whole-body scan "
                        "(default: %(default)s: 8 and 16 tiles at 3 mm)")
    p.add_argument("--clinical-spacing", type=_clinical_spacing, metavar="X,Y,Z",
                   default=",".join(f"{v:g}" for v in CLINICAL_SPACING_MM),
                   help="voxel size of the clinical scans in mm (default: %(default)s)")
    p.add_argument("--clinical-source", type=Path, metavar="FILE",
                   help="the real CT the clinical scans are made from (default: see --clinical)")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing outputs (without it an existing output is kept; with --from, "
                        "one whose content differs from its source is reported as an error)")
    p.add_argument("--url", metavar="URL",
                   help="download the chosen data set's archive from this mirror instead (still verified)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _clinical_sizes(text) -> list[tuple[int, int, int]]:
    """"200,500" -> [(512, 512, 200), (512, 512, 500)]; an entry "XxYxZ" is a whole shape."""
    if not isinstance(text, str):
        return text
    sizes = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        parts = item.split("x")
        try:
            nums = [int(v) for v in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a slice count or XxYxZ shape: {item!r}") from None
        if len(nums) == 1:
            nums = [CLINICAL_INPLANE, CLINICAL_INPLANE, nums[0]]
        if len(nums) != 3 or min(nums) < 1:
            raise argparse.ArgumentTypeError(f"not a slice count or XxYxZ shape: {item!r}")
        sizes.append(tuple(nums))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def _clinical_spacing(text) -> tuple[float, float, float]:
    if not isinstance(text, str):
        return text
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not X,Y,Z millimetres: {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(0 < v < 100 for v in vals):
        raise argparse.ArgumentTypeError(f"not three positive X,Y,Z millimetres: {text!r}")
    return vals


# ---- download ---------------------------------------------------------------------------------
def run_download(name: str, out: Path, max_samples: int, force: bool, url: str | None, progress: bool) -> None:
    source = download.SOURCES[name]
    archives = out / DOWNLOADS_SUBDIR
    if not source.confirmed:
        warn(f"{source.name}: {source.note}; the archive's checksum is not pinned, only its size is checked")
    say(f"{source.name}: {url or source.url}")
    archive = download.download_source(source, archives, url=url, progress=progress)
    try:
        if name == "spleen":
            result = download.extract_spleen(archive, out, max_samples, force=force)
        else:
            result = download.extract_learn2reg(archive, out / LEARN2REG_SUBDIR, max_samples, force=force)
    except DownloadError:
        if source.md5 is None and source.sha256 is None:
            archive.unlink(missing_ok=True)  # unverifiable and unreadable: let the next run fetch it again
        raise
    for path in result.written:
        say(f"  wrote {path}")
    for path in result.skipped:
        say(f"  kept existing {path} (use --force to overwrite)")


# ---- import -----------------------------------------------------------------------------------
NAME_JOIN = "__"  # p1/CT/ -> p1__CT.nii.gz: the path below --from, its parts joined
MAX_SKIPPED_SHOWN = 10


class ImportPlan(NamedTuple):
    """What one --from import does: ``items`` (source, target name in OUT); ``refused`` one-line reasons for
    sources that are not imported; ``skipped`` files that are neither NIfTI nor part of a DICOM series."""

    items: list[tuple[Path, str]]
    refused: list[str]
    skipped: list[Path]


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
    zips = [p for p in files if is_zip_path(p)]  # a zipped DICOM series (common.dicom reads it)
    skipped = [p for p in files if not is_nifti_path(p) and not is_zip_path(p) and p.parent not in series]
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
    return ImportPlan(items, refused, skipped)


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
    """True when the NIfTI file ``target`` holds the voxel values (x, y, z) and affine (1e-4 mm) of ``img``."""
    try:
        other = nib.load(str(target))
        if other.shape != img.shape or not np.allclose(other.affine, img.affine, atol=1e-4, rtol=0):
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
        warn(w)
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


# ---- realistic variants -----------------------------------------------------------------------
def run_realistic(out: Path, force: bool) -> int:
    scans = sorted(p for p in out.glob("*") if p.is_file() and is_nifti_path(p) and not p.name.startswith(".")
                   and not is_label_file(p))
    if not scans:
        raise InputError(out, "no scans (*.nii.gz) to make realistic variants of; download or import some first")
    failures = 0
    for scan in scans:
        # a distinct scan id, so that masks and passports of a scan and its variant never collide
        target = out / REALISTIC_SUBDIR / (scan_id(scan) + "_realistic.nii.gz")
        if target.exists() and not force:
            say(f"  kept existing {target} (use --force to overwrite)")
            continue
        try:
            vol, _ = load_scan(scan)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            failures += 1
            continue
        variant = realistic_variant(vol.image)
        write_variant(variant, target)
        say(f"  wrote {target} ({'x'.join(map(str, variant.shape))})")
    return failures


# ---- clinical-size scans ----------------------------------------------------------------------
def clinical_source(out: Path, source: Path | None) -> Path:
    """The real CT the clinical scans are made from: ``source``, else OUT/example_ct.nii.gz, else the shared
    example CT. InputError when none exists."""
    if source is not None:
        if not source.is_file():
            raise InputError(source, "clinical source scan not found (--clinical-source)")
        return source
    for cand in (out / CLINICAL_SOURCE_NAME, SHARED_CT / CLINICAL_SOURCE_NAME):
        if cand.is_file():
            return cand
    raise InputError(out / CLINICAL_SOURCE_NAME, "no real CT to build clinical-size scans from (also not in "
                                                 f"{SHARED_CT}); import one (--from) or pass --clinical-source")


def run_clinical(out: Path, sizes: list[tuple[int, int, int]], spacing: tuple[float, float, float],
                 source: Path | None, force: bool) -> int:
    src = clinical_source(out, source)
    todo = [s for s in sizes if force or not (out / CLINICAL_SUBDIR / clinical_name(s)).exists()]
    for s in sizes:
        if s not in todo:
            say(f"  kept existing {out / CLINICAL_SUBDIR / clinical_name(s)} (use --force to overwrite)")
    if not todo:
        return 0
    try:
        vol, _ = load_scan(src)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    say(f"  source {src} ({'x'.join(map(str, vol.shape))}, {vol.orientation})")
    for shape in todo:
        target = out / CLINICAL_SUBDIR / clinical_name(shape)
        img = clinical_variant(vol.image, shape, spacing)
        write_variant(img, target)
        del img
        say(f"  wrote {target} ({'x'.join(map(str, shape))} voxels, "
            f"{' x '.join(f'{v:g}' for v in spacing)} mm)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    dataset = args.dataset
    if dataset is None and args.from_dir is None and not args.realistic and not args.clinical:
        dataset = "spleen"
    progress = not args.no_progress and sys.stderr.isatty()
    failures = 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.from_dir is not None:
            say(f"importing from {args.from_dir}")
            failures += run_import(args.from_dir, out, args.force)
        if dataset is not None:
            names = ["spleen", "learn2reg"] if dataset == "all" else [dataset]
            if args.url and len(names) > 1:
                raise InputError(None, "--url needs a single --dataset (spleen or learn2reg)")
            for name in names:
                run_download(name, out, args.max_samples, args.force, args.url, progress)
        if args.realistic:
            say(f"realistic variants -> {out / REALISTIC_SUBDIR}")
            failures += run_realistic(out, args.force)
        if args.clinical:
            say(f"clinical-size scans -> {out / CLINICAL_SUBDIR}")
            failures += run_clinical(out, _clinical_sizes(args.clinical_sizes),
                                     _clinical_spacing(args.clinical_spacing), args.clinical_source, args.force)
    except (DownloadError, InputError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:  # disk full, permissions, ...
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr, flush=True)
        return 130
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
