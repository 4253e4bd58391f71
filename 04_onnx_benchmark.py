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

from common.cli.args import fail, run_script, script_parser
from common.cli.script_args import add_run_arguments, report_efficiency, start_onnx_run
from common.core.errors import InputError
from common.inference.model_cache import model_record
from common.runs.efficiency import EFFICIENCY_HELP


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__)
    add_run_arguments(p, "04_onnx")
    p.add_argument("--efficiency", action="store_true", help=EFFICIENCY_HELP)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from common.inference.predictor_factory import build_predictor
    from common.inference.run_config import RunConfig
    from common.records.results import new_result
    from common.runs.bench import run_benchmark_batch, segment_runner

    try:
        batch, spec, onnx = start_onnx_run(args)
        cfg = RunConfig(name="onnxruntime defaults")
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
        report_efficiency(result, onnx, spec, cfg.ort.intra_op_threads)
    return run_benchmark_batch(result, batch, segment_runner(spec, predictor, cfg.segment), args, "04 onnx")


if __name__ == "__main__":
    sys.exit(run_script(main))
