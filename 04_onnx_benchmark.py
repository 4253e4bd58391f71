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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.cli import (  # noqa: E402
    add_run_arguments,
    ensure_onnx,
    fail,
    model_record,
    start_run,
)
from common.errors import InputError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "04_onnx")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from common.bench import benchmark_scans, segment_runner
    from common.results import new_result, summarize, write_result
    from common.runner import RunConfig, build_predictor

    try:
        scans, source, spec = start_run(args.input, args.max_samples, args.weights)
        cfg = RunConfig(name="onnxruntime defaults")
        predictor = build_predictor(cfg, spec, ensure_onnx(spec, args.onnx))
    except (InputError, FileExistsError, RuntimeError) as exc:
        return fail(exc)
    print(f"data: {source}")
    result = new_result("04_onnx_benchmark.py", method="onnx_default",
                        settings={"config": cfg.to_dict(), "repeats": args.repeats, "warmup": args.warmup,
                                  "session": predictor.describe(), "input": source},
                        model=model_record(spec))
    result["scans"] = benchmark_scans(scans, segment_runner(spec, predictor, cfg.segment), args.out,
                                      args.repeats, args.warmup, desc="04 onnx")
    summarize(result)
    write_result(result, args.result)
    print(f"result: {args.result} (weights: {spec.provenance()['weights']})")
    return 1 if result["summary"]["n_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
