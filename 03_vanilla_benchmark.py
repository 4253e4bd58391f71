#!/usr/bin/env python
"""Stage 03: the official TotalSegmentator (python API, task 'total', fast, CPU) as the reference.

Runs offline on the Task 297 weights where TotalSegmentator keeps them (official, or the seeded stand-in
written by 02). Per scan: one warm-up run (not counted), then --repeats timed runs of the whole official
call (its load, resampling, nnU-Net prediction, resampling back and saving happen inside one call, so
only the total is timed). Peak memory: the isolated worker's peak RSS (its own plus its children's,
ru_maxrss), one fresh worker per scan, so the figure is that scan's (start-up and warm-up included). The
tile count recorded per scan is the one our pipeline runs on the same scan (common.inference.tile_count, tile step 0.8,
as the official tool). The reference masks go to benchmarks/03_vanilla/<scan>_seg.nii.gz (written by
the official tool into a temporary name, then renamed), the result to benchmarks/03_vanilla.json.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from common.cli.args import fail, positive_float, run_script, script_parser
from common.cli.script_args import add_run_arguments, start_run
from common.core.errors import InputError
from common.inference.model_cache import model_record

DEVICE = re.compile(r"^(cpu|mps|(gpu|cuda)(:\d+)?)$")


def _device(text: str) -> str:
    if not DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"must be cpu, gpu, gpu:N, cuda, cuda:N or mps, not {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__)
    add_run_arguments(p, "03_vanilla", onnx=False, out_help="reference mask folder")
    p.add_argument("--device", type=_device, default="cpu",
                   help="device for the official tool: cpu, gpu[:N], cuda[:N], mps (default cpu)")
    p.add_argument("--official-timeout", type=positive_float, default=None, metavar="S",
                   help="time limit of one official call in seconds; a call past it is killed and its scan "
                        "recorded as failed (default: 300 s + 60 s per 112x112x128 tile of the scan)")
    return p


def official_runner(weights_folder: Path, device: str, timeout_s: float | None, spec=None):
    """RunFn for the official tool. Each scan gets its own isolated worker process (started before the
    scan's first call, not timed; ended after its last), so a stuck call costs only that scan and the
    worker's peak RSS is the scan's. Each call returns, besides the time and labels, the worker's peak RSS
    and (with ``spec``, the ModelSpec) the scan's tile count."""
    import contextlib
    import time

    import nibabel as nib
    import numpy as np

    from common.core.atomic import atomic_path
    from common.core.peak_memory import METHOD_OFFICIAL_WORKER
    from common.runs.official import OfficialRunner

    state: dict = {"scan": None, "runner": None}

    def close() -> None:
        if state["runner"] is not None:
            state["runner"].close()
        state.update(scan=None, runner=None)

    def run(scan: Path, mask_path: Path | None):
        if state["scan"] != scan:
            close()
            state.update(scan=scan, runner=OfficialRunner(weights_folder))
            state["runner"].start()
        # the official tool writes the mask itself (inside the timed call), to a temporary name that is
        # renamed once complete
        with atomic_path(mask_path, suffix=".nii.gz") as tmp:
            t0 = time.perf_counter()
            call = state["runner"].segment(scan, tmp, device=device, timeout_s=timeout_s)
            total = time.perf_counter() - t0
            img = nib.load(tmp)
            labels = np.asanyarray(img.dataobj)
        extra = {"peak_rss_bytes": call.peak_rss_bytes, "peak_rss_method": METHOD_OFFICIAL_WORKER}
        if spec is not None:
            from common.inference.tile_count import tiles_for_image

            with contextlib.suppress(Exception):  # the count is informative; never fail a scan over it
                extra["n_tiles"] = tiles_for_image(img, spec)
        return total, {}, labels, extra

    run.close = close
    return run


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from common.records.results import new_result
    from common.runs.bench import run_benchmark_batch

    try:
        batch, spec = start_run(args)
    except (InputError, OSError, RuntimeError) as exc:
        return fail(exc)
    source = batch.source
    print(f"data: {source}")
    settings = {"task": "total", "fast": True, "device": args.device, "isolation": "one worker process per scan",
                "official_timeout_s": args.official_timeout or "300 + 60 per tile", "repeats": args.repeats,
                "warmup": args.warmup, "input": source, "torch_threads": os.cpu_count(),
                "peak_rss": "the isolated worker's ru_maxrss, self + children, one fresh worker per scan",
                "stages": "not separable: the official tool is timed as one call (load..save)"}
    result = new_result("03_vanilla_benchmark.py", method="official_pytorch", settings=settings,
                        model=model_record(spec))
    run = official_runner(spec.folder, args.device, args.official_timeout, spec=spec)
    try:
        return run_benchmark_batch(result, batch, run, args, "03 official")
    finally:
        run.close()


if __name__ == "__main__":
    sys.exit(run_script(main))
