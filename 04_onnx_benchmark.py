#!/usr/bin/env python
"""Stage 04: our segment() pipeline with plain ONNX Runtime defaults (the 'before tuning' figure).

Faithful pipeline options (resampling order 1, tile step 0.8, float16 logit sums as nnU-Net), one ONNX
Runtime session with its default settings, reused across scans. Per scan: one warm-up run (not counted),
then --repeats timed runs (load, preprocess, inference, postprocess, save). Masks go to
benchmarks/04_onnx/, the result to benchmarks/04_onnx.json.
"""
from __future__ import annotations

import argparse
import sys

from common.args import run_script, script_parser
from common.cli import (
    add_run_arguments,
    ensure_onnx,
    fail,
    model_record,
    start_run,
)
from common.efficiency import EFFICIENCY_HELP
from common.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__)
    add_run_arguments(p, "04_onnx")
    p.add_argument("--efficiency", action="store_true", help=EFFICIENCY_HELP)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from common.bench import run_benchmark_batch, segment_runner
    from common.results import new_result
    from common.runner import RunConfig, build_predictor

    try:
        batch, spec = start_run(args)
        cfg = RunConfig(name="onnxruntime defaults")
        onnx = ensure_onnx(spec, args.onnx)
        predictor = build_predictor(cfg, spec, onnx)
    except (InputError, OSError, RuntimeError) as exc:
        return fail(exc)
    source = batch.source
    print(f"data: {source}")
    result = new_result("04_onnx_benchmark.py", method="onnx_default",
                        settings={"config": cfg.to_dict(), "repeats": args.repeats, "warmup": args.warmup,
                                  "session": predictor.describe(), "input": source},
                        model=model_record(spec))
    if args.efficiency:
        from common.cluster_args import usable_cores
        from common.efficiency import measure_into

        print(measure_into(result, onnx, spec.patch_size, cfg.ort.intra_op_threads or usable_cores()))
    return run_benchmark_batch(result, batch, segment_runner(spec, predictor, cfg.segment), args, "04 onnx")


if __name__ == "__main__":
    sys.exit(run_script(main))
