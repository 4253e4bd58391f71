"""What the numbered scripts share: project paths, scan discovery, the embedded default, weights set-up.

Scripts stay thin: argparse, progress, and calls into here and the rest of common/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.args import check_outputs, nonnegative_int, positive_int
from common.dicom import is_zip_path
from common.discovery import Batch, discover, is_label_file, merge  # noqa: F401 (is_label_file: 01 uses it)
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
DEFAULT_SUBFOLDERS = ("realistic", "clinical")  # searched after ct_data/'s own scans, in this order


def resolve_inputs(input_arg: str | None, max_samples: int | None = None, log=print, *,
                   output_dirs: tuple[Path, ...] = (), output_files: tuple[Path, ...] = ()) -> Batch:
    """The batch to process (common.discovery.Batch: scans with unique ids, ignored and refused entries)
    and a one-line description of where it came from (``batch.source``).

    --input (a file, a DICOM series folder, or a folder searched recursively) wins; else ct_data/ (its own
    NIfTI files, DICOM series folders and zips of them, then the realistic-size variants in ct_data/realistic/ made by 01
    --realistic, then the clinical-size multi-tile scans in ct_data/clinical/ made by 01 --clinical, last so
    that a sweep over the first scans stays on small ones); else the embedded synthetic phantom (written once
    under benchmarks/embedded/). ``output_dirs``/``output_files``: this run's outputs, never taken as inputs.
    Raises InputError when --input does not exist or holds nothing to process.
    """
    where = {"output_dirs": output_dirs, "output_files": output_files}
    if input_arg:
        root = Path(input_arg)
        if not root.exists() and not root.is_symlink():
            raise InputError(root, "input not found")
        batch = discover(root, **where)
        batch.source = f"--input {input_arg}"
        if not batch.scans and not batch.refused:
            why = "; ".join(f"{Path(i['file']).name}: {i['reason']}" for i in batch.ignored[:3])
            raise InputError(root, "nothing to do: no scan found" + (f" ({len(batch.ignored)} ignored — {why})"
                                                                     if batch.ignored else " (empty)"))
    else:
        parts = []
        for folder in (CT_DATA, *(CT_DATA / name for name in DEFAULT_SUBFOLDERS)):
            if not folder.is_dir():
                continue
            part = discover(folder, recursive=False, **where)
            part.ignored = [i for i in part.ignored if not (folder == CT_DATA and Path(i["file"]).name
                                                             in (*DEFAULT_SUBFOLDERS, "downloads"))]
            for scan in [p for p in part.scans if p.is_file() and not is_nifti_path(p) and not is_zip_path(p)]:
                part.scans.remove(scan)
                part.ignored.append({"file": str(scan), "reason": "not a NIfTI file, DICOM series folder or zip"})
            parts.append(part)
        batch = merge(parts)
        batch.source = f"ct_data/ ({len(batch.scans)} scans)"
        if not batch.scans:
            batch = discover(embedded_phantom(log))
            batch.source = "embedded synthetic CT phantom (ct_data/ holds no scans)"
    for note in batch.notes:
        log(f"note: {note}")
    return batch.limit(max_samples)


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
        parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per scan (default 3)")
        parser.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed runs per scan first (default 1)")
    parser.add_argument("--max-samples", type=positive_int, default=None, metavar="N",
                        help="process at most N scans")
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


def start_run(args: argparse.Namespace) -> tuple[Batch, object]:
    """Common start of 03-06 (options of add_run_arguments): clean exit on SIGTERM; --out and --result
    checked writable before any work; the batch (common.discovery.Batch, with where it came from in
    ``.source``); the Task 297 ModelSpec. Raises InputError / OSError / RuntimeError with one-line messages."""
    exit_cleanly_on_sigterm()
    check_outputs(folders=(args.out,), files=(args.result,))
    batch = resolve_inputs(args.input, args.max_samples, output_dirs=(args.out,), output_files=(args.result,))
    return batch, prepare_model(args.weights)


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
