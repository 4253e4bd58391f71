"""What the numbered scripts share: project paths, scan discovery, the embedded default, weights set-up.

Scripts stay thin: argparse, progress, and calls into here and the rest of common/.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from common.errors import InputError
from common.volume import is_nifti_path

# A terminal or CI log that is not UTF-8 must not crash a script over a dash or an ellipsis in a message.
for _stream in (sys.stdout, sys.stderr):
    if hasattr(_stream, "reconfigure") and (_stream.encoding or "").lower().replace("-", "") != "utf8":
        _stream.reconfigure(errors="backslashreplace")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CT_DATA = PROJECT_ROOT / "ct_data"
BENCHMARKS = PROJECT_ROOT / "benchmarks"
MODELS = PROJECT_ROOT / "models"
DEFAULT_ONNX = MODELS / "task297.onnx"
OPTIMIZED_CONFIG = BENCHMARKS / "optimized_config.json"
EMBEDDED_DIR = BENCHMARKS / "embedded"
LABEL_FILE = re.compile(r"(_seg|_labels?|_mask|_gt)(_[a-z0-9]+)?$")


def is_label_file(path: Path) -> bool:
    """Label maps beside scans (``x_seg``, ``x_labels``, ``x_seg_fast``, ``x_mask``, ``x_gt`` + .nii[.gz])."""
    name = path.name.lower()
    stem = name[:-7] if name.endswith(".nii.gz") else name[:-4] if name.endswith(".nii") else name
    return bool(LABEL_FILE.search(stem))


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir() if p.is_file())


def find_scans(input_path: Path, recursive: bool = False) -> list[Path]:
    """Scans under ``input_path``: a file itself, or the NIfTI files (and DICOM series folders) of a folder,
    sorted by name; label maps (``*_seg``/``*_labels``...) and hidden files are skipped. Files that are
    neither NIfTI nor DICOM are still returned so that the batch reports them as bad input."""
    if not input_path.exists():
        raise InputError(input_path, "input not found")
    if input_path.is_file() or _is_dicom_dir(input_path):
        return [input_path]
    found: list[Path] = []
    for p in sorted(input_path.iterdir()):
        if p.name.startswith(".") or p.name.lower() in ("readme.md", "license", "license.txt"):
            continue
        if p.is_file() and not is_label_file(p):
            found.append(p)
        elif p.is_dir():
            if _is_dicom_dir(p):
                found.append(p)
            elif recursive:
                found += find_scans(p, recursive=True)
    return found


def resolve_inputs(input_arg: str | None, max_samples: int | None = None, log=print) -> tuple[list[Path], str]:
    """Scans to process and a one-line description of where they came from.

    --input wins; else ct_data/ (its top level: downloaded and imported scans, then the realistic-size
    variants in ct_data/realistic/ made by 01 --realistic, then the clinical-size multi-tile scans in
    ct_data/clinical/ made by 01 --clinical, last so that a sweep over the first scans stays on small ones);
    else the embedded synthetic phantom (written once under benchmarks/embedded/).
    """
    if input_arg:
        scans = find_scans(Path(input_arg))
        source = f"--input {input_arg}"
    else:
        subfolders = ("realistic", "clinical")
        folders = [CT_DATA, *(CT_DATA / name for name in subfolders)]
        scans = [p for f in folders if f.exists() for p in find_scans(f)
                 if (is_nifti_path(p) or p.is_dir()) and not (f == CT_DATA and p.name in subfolders)]
        source = f"ct_data/ ({len(scans)} scans)"
        if not scans:
            scans = [embedded_phantom(log)]
            source = "embedded synthetic CT phantom (ct_data/ is empty)"
    if max_samples is not None:
        scans = scans[:max_samples]
    return scans, source


def embedded_phantom(log=print) -> Path:
    """The synthetic CT phantom (0.8 x 0.8 x 1.5 mm, clinical size) with ground truth; generated once."""
    from common.phantom import write_phantom

    ct = EMBEDDED_DIR / "phantom_ct.nii.gz"
    if not ct.exists() or not (EMBEDDED_DIR / "phantom_ct_labels.nii.gz").exists():
        log(f"ct_data/ is empty: writing the embedded synthetic CT phantom to {ct.relative_to(PROJECT_ROOT)}")
        write_phantom(EMBEDDED_DIR, name="phantom_ct")
    return ct


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=["auto", "official", "standin"], default="auto",
                        help="Task 297 weights: 'auto' uses the official weights installed where TotalSegmentator "
                             "looks ($TOTALSEG_HOME_DIR or ~/.totalsegmentator), else tries TotalSegmentator's own "
                             "download, else uses the seeded stand-in kept in the project "
                             "(models/totalseg_home; never written into your TotalSegmentator home); "
                             "'official' fails instead of using the stand-in; 'standin' always uses it "
                             "(default: auto)")


def add_run_arguments(parser: argparse.ArgumentParser, stage: str, *, onnx: bool = True, timing: bool = True,
                      out_help: str = "mask folder") -> None:
    """The options 03-06 share: --input, --out, --result (defaults benchmarks/<stage>[.json]), --onnx,
    --repeats/--warmup (timed stages), --max-samples and --weights."""
    parser.add_argument("--input", help="a scan (NIfTI file or DICOM folder) or a folder of scans "
                                        "(default: ct_data/, ct_data/realistic/ and ct_data/clinical/, else the "
                                        "embedded phantom)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / stage,
                        help=f"{out_help} (default: benchmarks/{stage})")
    parser.add_argument("--result", type=Path, default=BENCHMARKS / f"{stage}.json",
                        help=f"result JSON in the shared schema (default: benchmarks/{stage}.json)")
    if onnx:
        parser.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="ONNX model (exported on first use)")
    if timing:
        parser.add_argument("--repeats", type=int, default=3, help="timed runs per scan (default 3)")
        parser.add_argument("--warmup", type=int, default=1, help="untimed runs per scan first (default 1)")
    parser.add_argument("--max-samples", type=int, default=None, help="process at most N scans")
    add_weights_argument(parser)


def prepare_model(weights_mode: str = "auto", log=print):
    """Ensure Task 297 weights exist (official or stand-in) and return their ModelSpec."""
    from common.model import load_model_spec
    from common.weights import ensure_task297

    folder = ensure_task297(weights_mode, log=log)
    spec = load_model_spec(folder)
    kind = "STAND-IN (seeded random; timings real, anatomy not)" if spec.is_standin else "official"
    log(f"weights: {kind} — {folder}")
    return spec


def onnx_variant_path(onnx_path: Path, precise_norm: bool) -> Path:
    """The file of an export variant: <name>.onnx (precise InstanceNorm) or <name>_nativenorm.onnx."""
    return onnx_path if precise_norm else onnx_path.with_name(onnx_path.stem + "_nativenorm.onnx")


def ensure_onnx(spec, onnx_path: Path = DEFAULT_ONNX, log=print, precise_norm: bool = True) -> Path:
    """Export the model to ONNX if the file is missing, stale (other weights) or another variant."""
    import json

    from common.onnx_export import export_and_check

    onnx_path = onnx_variant_path(onnx_path, precise_norm)
    meta = onnx_path.with_suffix(".json")
    want_norm = "precise" if precise_norm else "native"
    if onnx_path.exists() and meta.exists():
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            if (info.get("model", {}).get("sha256") == spec.checkpoint_sha256
                    and info.get("instance_norm", "native").startswith(want_norm)):
                return onnx_path
        except json.JSONDecodeError:
            pass
    log(f"exporting the network to {onnx_path} (once per set of weights)")
    export_and_check(spec, onnx_path, precise_norm=precise_norm)
    return onnx_path


def model_record(spec) -> dict:
    """The model entry of a result file: weights provenance (official/standin, sha256) and label names."""
    return {**spec.provenance(), "labels": {str(k): v for k, v in spec.labels.items()}}


def start_run(input_arg: str | None, max_samples: int | None, weights: str):
    """Common start of 03-06: clean exit on SIGTERM, the scans to process (and where they came from), and
    the Task 297 ModelSpec. Raises InputError / FileExistsError / RuntimeError with one-line messages."""
    exit_cleanly_on_sigterm()
    scans, source = resolve_inputs(input_arg, max_samples)
    return scans, source, prepare_model(weights)


_FORK_HOOK_INSTALLED = False


def _default_sigterm_in_child() -> None:
    """After a fork: SIGTERM kills again. A Python-level handler only runs when the interpreter regains
    control, so a forked pool worker blocked in sem_wait would swallow the Pool.terminate() SIGTERM and
    hang its parent forever (seen in nnU-Net's pools)."""
    import signal

    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # forked from a non-main thread: no handler of ours was inherited there
        pass


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in this process only, so that atomic writes in progress remove their
    temporary files (a SIGKILL cannot be caught: then only a hidden .tmp-* file may remain, never a partial
    output). Forked children get the default disposition back (os.register_at_fork)."""
    import os
    import signal

    global _FORK_HOOK_INSTALLED

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    if not _FORK_HOOK_INSTALLED:
        os.register_at_fork(after_in_child=_default_sigterm_in_child)
        _FORK_HOOK_INSTALLED = True


def fail(message: str, code: int = 2) -> int:
    """Print one line to stderr and return the exit code."""
    print(" ".join(str(message).split()), file=sys.stderr)
    return code
