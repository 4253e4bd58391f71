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
import os
import sys
from pathlib import Path

from common.cli.args import OneLineParser, positive_int, run_script
from common.core.errors import DownloadError, InputError
from common.core.paths import CT_DATA, PROJECT_ROOT
from common.imaging.archives import extract_learn2reg, extract_spleen
from common.imaging.discovery import is_label_file
from common.imaging.scan_paths import is_nifti_path, scan_id
from common.imaging.validation import load_scan
from common.sources import download
from common.sources.scan_import import run_import, say, warn
from common.sources.variants import (
    CLINICAL_INPLANE,
    CLINICAL_SLICES,
    CLINICAL_SPACING_MM,
    REALISTIC_SPACING_MM,
    clinical_name,
    clinical_variant,
    realistic_variant,
    write_variant,
)

DEFAULT_OUT = CT_DATA
DOWNLOADS_SUBDIR = "downloads"
LEARN2REG_SUBDIR = "learn2reg"
REALISTIC_SUBDIR = "realistic"
CLINICAL_SUBDIR = "clinical"
CLINICAL_SOURCE_NAME = "example_ct.nii.gz"
SHARED_CT = Path(os.environ.get("TS_BENCH_SHARED_CT", PROJECT_ROOT.parent / "shared" / "data" / "ct"))


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
            result = extract_spleen(archive, out, max_samples, force=force)
        else:
            result = extract_learn2reg(archive, out / LEARN2REG_SUBDIR, max_samples, force=force)
    except DownloadError:
        if source.md5 is None and source.sha256 is None:
            archive.unlink(missing_ok=True)  # unverifiable and unreadable: let the next run fetch it again
        raise
    for path in result.written:
        say(f"  wrote {path}")
    for path in result.skipped:
        say(f"  kept existing {path} (use --force to overwrite)")


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
