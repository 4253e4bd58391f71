"""The options and the start that stages 03-06 share: --input/--out/--result/--onnx/--repeats/--warmup/
--max-samples/--weights, then outputs checked, the batch found, the weights (and ONNX export) set up."""
from __future__ import annotations

import argparse
from pathlib import Path

from common.cli.args import check_outputs, nonnegative_int, positive_int
from common.core.paths import BENCHMARKS, DEFAULT_ONNX
from common.core.signals import exit_cleanly_on_sigterm
from common.imaging.discovery import Batch
from common.inference.model import ModelSpec
from common.inference.model_cache import ensure_onnx, prepare_model
from common.sources.inputs import resolve_inputs


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """--weights auto|official|standin (02-06 and totalseg-fast)."""
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


def start_run(args: argparse.Namespace) -> tuple[Batch, ModelSpec]:
    """Common start of 03-06 (options of add_run_arguments): clean exit on SIGTERM; --out and --result
    checked writable before any work; the batch (common.imaging.discovery.Batch, with where it came from in
    ``.source``); the Task 297 ModelSpec. Raises InputError / OSError / RuntimeError with one-line messages."""
    exit_cleanly_on_sigterm()
    check_outputs(folders=(args.out,), files=(args.result,))
    batch = resolve_inputs(args.input, args.max_samples, output_dirs=(args.out,), output_files=(args.result,))
    return batch, prepare_model(args.weights)


def start_onnx_run(args: argparse.Namespace, *, export: bool = True) -> tuple[Batch, ModelSpec, Path | None]:
    """start_run, then (when ``export``) the model exported to ``args.onnx`` once per set of weights: the batch,
    the ModelSpec and the ONNX file (None without ``export``). Same exceptions as start_run."""
    batch, spec = start_run(args)
    return batch, spec, ensure_onnx(spec, args.onnx) if export else None


def report_efficiency(result: dict, onnx: Path, spec: ModelSpec, threads: int | None,
                      precision: str = "float32") -> None:
    """--efficiency of 04-06: measure this machine's peaks with the fastest kernels (on the backend's
    ``threads``, else all usable cores; common.runs.compute_peak) and the tile's FLOPs (from the ONNX graph)
    into ``result``, the limit at the peak of the network's ``precision``; print the one-line summary."""
    from common.core.machine import usable_cores
    from common.runs.efficiency import measure_into

    print(measure_into(result, onnx, spec.patch_size, threads or usable_cores(), precision))
