#!/usr/bin/env python
"""Stage 05: find the fastest faithful configuration on this machine, then benchmark it.

Sweep (one factor at a time from the baseline, then the best factors combined): backend and threads
(ONNX Runtime intra-op threads 1..cores, PyTorch and PyTorch channels-last threads), ONNX Runtime graph
optimisation level and execution mode, resampling order (1 vs 3), tile step (0.5, the official 0.8, 1.0),
float16 vs float32 logit sums, tiles per predictor call, threads for resampling, glibc keeping freed
memory. The sweep scans are the first --sweep-scans valid inputs, with the smallest multi-tile input in
place of the last when all of them fit in one tile. Each configuration runs the sweep scans
(after one untimed warm-up) and is compared voxel by voxel with the reference masks of 03 (or, without a
03 result, with the faithful PyTorch pipeline, which reproduces the official output). The three fastest
configurations with >= 99.9 % agreement on every sweep scan and the baseline are re-timed (median of
--finalist-runs); the fastest of those is written to benchmarks/optimized_config.json
(06 uses it) and benchmarked on all scans (warm-up + --repeats). The whole sweep is kept in the result.
Approximate candidates (the bf16 network, common.inference.precision) are swept only with --allow-approximate,
and chosen under the same >= 99.9 % rule on the user's own scans and weights; without it, never.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from common.cli.args import fail, positive_int, run_script, script_parser, unit_fraction
from common.cli.script_args import add_run_arguments, report_efficiency, start_onnx_run
from common.core.errors import InputError
from common.core.paths import BENCHMARKS, OPTIMIZED_CONFIG
from common.inference.model_cache import model_record
from common.runs.efficiency import EFFICIENCY_HELP


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__)
    add_run_arguments(p, "05_optimized")
    p.add_argument("--efficiency", action="store_true", help=EFFICIENCY_HELP + " (for the final benchmark of "
                   "the chosen configuration)")
    p.add_argument("--reference", type=Path, default=BENCHMARKS / "03_vanilla.json",
                   help="03's result JSON whose masks are the reference (default benchmarks/03_vanilla.json)")
    p.add_argument("--config-out", type=Path, default=OPTIMIZED_CONFIG, help="where the chosen configuration goes")
    p.add_argument("--sweep-scans", type=positive_int, default=3,
                   help="scans used for the sweep (default 3): the first that are valid, with the smallest "
                        "multi-tile scan in place of the last when all of them fit in one tile")
    p.add_argument("--finalist-runs", type=positive_int, default=3,
                   help="timed runs per scan when re-timing the 3 fastest faithful configurations and the "
                        "baseline, which decides the choice (default 3)")
    p.add_argument("--threshold", type=unit_fraction, default=0.999,
                   help="minimum voxel agreement, a fraction in (0, 1] (default 0.999)")
    p.add_argument("--no-sweep", action="store_true", help="benchmark the configuration in --config-out as is")
    p.add_argument("--allow-approximate", action="store_true",
                   help="also sweep APPROXIMATE candidates (the bf16 network, where the CPU has native bf16); one is "
                        "chosen only if it reaches --threshold agreement with 03 on every sweep scan, like any other "
                        "(without this option no approximate configuration is ever swept or chosen)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from common.cli.args import check_outputs
    from common.inference.precision import describe, label
    from common.inference.predictor_factory import build_predictor
    from common.inference.run_config import load_config, save_config
    from common.records.results import new_result
    from common.runs.bench import run_benchmark_batch, segment_runner
    from common.runs.sweep import SweepRow, select_fastest
    from common.runs.sweep_run import pick_sweep_scans, reference_masks, run_sweep

    try:
        if not args.no_sweep:
            check_outputs(files=(args.config_out,))
        batch, spec, onnx = start_onnx_run(args)
    except (InputError, OSError, RuntimeError) as exc:
        return fail(exc)
    source = batch.source
    print(f"data: {source}")
    sweep_scans = [] if args.no_sweep else pick_sweep_scans(batch.scans, args.sweep_scans, spec)
    rows: list[SweepRow] = []
    retimed: list[SweepRow] = []
    chosen_row = None
    if args.no_sweep:
        cfg = load_config(args.config_out)
        ref_source = None
    else:
        if not sweep_scans:
            return fail("no valid scan to sweep on")
        refs, ref_source = reference_masks(args.reference, sweep_scans, spec)
        print(f"sweep on {len(sweep_scans)} scan(s); reference: {ref_source}")
        t0 = time.perf_counter()
        rows, retimed = run_sweep(spec, onnx, sweep_scans, refs, args.threshold, args.finalist_runs,
                                  allow_approximate=args.allow_approximate)
        chosen_row = select_fastest(retimed, args.threshold, allow_approximate=args.allow_approximate)
        if chosen_row is None:
            return fail(f"no configuration reached {args.threshold:.1%} agreement; nothing written", 1)
        cfg = copy.deepcopy(chosen_row.config)  # the rows keep the name they were timed under
        cfg.name = f"optimized ({chosen_row.name})"
        save_config(cfg, args.config_out, extra={"chosen_by": "05_optimized_python_benchmark.py",
                                                 "threshold": args.threshold, "reference": ref_source,
                                                 "sweep_seconds": sum(chosen_row.seconds),
                                                 "sweep_agreement": chosen_row.agreement})
        print(f"chosen: {chosen_row.name} -> {args.config_out} (sweep took {time.perf_counter() - t0:.0f} s); "
              f"{label(cfg.precision)}")
    predictor = build_predictor(cfg, spec, onnx if cfg.backend == "onnxruntime" else None)
    settings = {"config": cfg.to_dict(), "repeats": args.repeats, "warmup": args.warmup, "input": source,
                "threshold": args.threshold, "reference": ref_source, "session": predictor.describe()}
    result = new_result("05_optimized_python_benchmark.py", method="optimized", settings=settings,
                        model=model_record(spec))
    result["sweep"] = [r.to_json() for r in rows]
    result["finalists"] = [r.to_json() for r in retimed]
    result["chosen"] = chosen_row.name if chosen_row else cfg.name
    result["arithmetic"] = describe(cfg.precision)
    result["settings"]["allow_approximate"] = args.allow_approximate
    if args.efficiency:  # the tile's FLOPs are counted from the ONNX graph, whichever backend runs it
        report_efficiency(result, onnx, spec, cfg.threads, cfg.precision)
    return run_benchmark_batch(result, batch, segment_runner(spec, predictor, cfg.segment), args, "05 optimized")


if __name__ == "__main__":
    sys.exit(run_script(main))
