"""Where one tile's seconds go, per network backend: ``python -m common.cli.profile_tile`` (issue 9's profile).

For each backend, in a child process of its own (so that peak memory and thread pools are its own):
one warm-up call, ``--runs`` timed calls of the network on one (1, 1, *patch) float32 tile (seeded
standard-normal values: dense float32 convolutions cost the same whatever the values) with the page faults
and system CPU seconds of each, the process's peak RSS, then one profiled call broken down by operator: ONNX Runtime's own profiler (per node kernel time,
summed by op type) or torch.profiler (self CPU time per aten op). The parent adds the tile's FLOPs (from the
ONNX graph) and this machine's float32 GEMM peak, so every backend gets its ratio to the compute limit, and
writes one JSON (atomically) plus a table on stdout.

Backends: ``ort`` (ONNX Runtime, graph optimisation disabled, memory pattern off: the fastest exact ONNX
Runtime configuration), ``ort_all`` (all graph optimisations), ``pytorch`` (nnU-Net's network as the official
tool runs it), ``channels_last`` (common.inference.torch_channels_last with glibc keeping freed memory, common.core.heap:
06's default), ``channels_last_mmap`` (the same network with glibc's default malloc).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("ort", "ort_all", "pytorch", "channels_last", "channels_last_mmap")
CHILD_TIMEOUT_S = 900  # one backend: model load + (runs + 2) tiles; a tile takes 4-8 s on 2 cores
TOP_OPS = 12


def _ort_ops(trace_path: str) -> dict[str, float]:
    """Seconds per op type in the last run of an ONNX Runtime profile (Chrome trace JSON): the kernel time of
    the "Node" events that start after the last "model_run" began."""
    events = json.loads(Path(trace_path).read_text(encoding="utf-8"))
    last_run = max((ev.get("ts", 0) for ev in events if ev.get("name") == "model_run"), default=0)
    ops: dict[str, float] = {}
    for ev in events:
        if ev.get("ts", 0) < last_run:
            continue
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + ev.get("dur", 0) / 1e6  # microseconds
    return ops


def _config(backend: str, threads: int):
    """The RunConfig that 06/05 would run for ``backend`` on ``threads`` threads (common.inference.run_config)."""
    from common.inference.run_config import OrtSettings, RunConfig

    if backend.startswith("ort"):
        cfg = RunConfig.fastest_exact_onnx()
        cfg.ort = OrtSettings(intra_op_threads=threads, mem_pattern=False,
                              graph_optimization="all" if backend == "ort_all" else "disable")
    elif backend == "pytorch":
        cfg = RunConfig(backend="pytorch")
    else:
        cfg = RunConfig.fastest_exact()
        cfg.keep_freed_memory = backend == "channels_last"
    cfg.torch_threads = threads
    return cfg


def _child(backend: str, runs: int, threads: int, onnx_path: str, model_folder: str) -> dict[str, Any]:
    """Time and profile one backend in this process, built as the pipeline builds it
    (common.inference.predictor_factory.build_predictor); the record the parent collects."""
    from common.core.heap import freed_memory_kept
    from common.core.peak_memory import track_peak_rss
    from common.inference.model import load_model_spec
    from common.inference.predictor_factory import build_predictor

    spec = load_model_spec(model_folder)
    cfg = _config(backend, threads)
    x = np.random.default_rng(0).standard_normal((1, 1, *spec.patch_size)).astype(np.float32)
    with track_peak_rss() as peak:
        predict = build_predictor(cfg, spec, Path(onnx_path))
        predict(x)  # warm-up: oneDNN/MLAS kernels are created on the first call
        seconds, faults, system_s = [], [], []
        for _ in range(runs):
            before = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            predict(x)
            seconds.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults.append(after.ru_minflt - before.ru_minflt)
            system_s.append(after.ru_stime - before.ru_stime)
    ops = _profile_ops(predict, x)
    total = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:TOP_OPS]
    return {"backend": backend, "config": cfg.to_dict(), "threads": threads, "freed_memory_kept": freed_memory_kept(),
            "runs": runs, "seconds": seconds,
            "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "page_faults_per_call": faults, "system_cpu_s_per_call": system_s,
            "peak_rss_bytes": peak.peak_bytes, "peak_rss_method": peak.method,
            "profiled_total_s": total, "ops": [{"op": k, "seconds": v, "share": v / total if total else None}
                                               for k, v in top]}


def _profile_ops(predict, x: np.ndarray) -> dict[str, float]:
    """Seconds per operator for one call, from the library's own profiler: for ONNX Runtime a second session
    with the same settings and its profiler on, for torch torch.profiler around the same predictor."""
    from common.inference.predictors import OnnxPredictor

    if isinstance(predict, OnnxPredictor):
        with tempfile.TemporaryDirectory(prefix="ts-bench-ortprof-") as tmp:
            profiled = OnnxPredictor(predict.model_path, predict.settings, profile_prefix=Path(tmp) / "ort")
            profiled(x)  # warm-up of the profiled session
            profiled(x)
            return _ort_ops(profiled.session.end_profiling())
    from torch.profiler import profile

    with profile() as prof:
        predict(x)
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages() if e.self_cpu_time_total > 0}


def _run_child(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """One backend in a fresh interpreter, with a time limit; the child's record, or {"error": one line}."""
    with tempfile.TemporaryDirectory(prefix="ts-bench-profile-") as tmp:
        out = Path(tmp) / "record.json"
        cmd = [sys.executable, "-m", "common.cli.profile_tile", "--child", backend, "--runs", str(args.runs),
               "--threads", str(args.threads), "--onnx", str(args.onnx), "--child-out", str(out),
               "--child-model", str(args.child_model)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"backend": backend, "error": f"did not finish within {CHILD_TIMEOUT_S} s"}
        if proc.returncode != 0 or not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"backend": backend, "error": f"exit {proc.returncode}: {last}"}
        return json.loads(out.read_text(encoding="utf-8"))


def _parser() -> argparse.ArgumentParser:
    from common.cli.args import positive_int
    from common.core.machine import usable_cores
    from common.core.paths import BENCHMARKS, DEFAULT_ONNX

    p = argparse.ArgumentParser(prog="python -m common.cli.profile_tile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, from {', '.join(BACKENDS)}")
    p.add_argument("--runs", type=positive_int, default=3, help="timed calls per backend after a warm-up (default 3)")
    p.add_argument("--threads", type=positive_int, default=usable_cores(), help="threads (default: usable cores)")
    p.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="ONNX model (exported on first use)")
    p.add_argument("--weights", choices=["auto", "official", "standin"], default="auto", help="weights (default auto)")
    p.add_argument("--out", type=Path, default=BENCHMARKS / "profile_tile.json", help="result JSON")
    p.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-model", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    from common.cli.args import fail
    from common.core.streams import setup_console

    setup_console()
    args = _parser().parse_args(argv)
    if args.child:
        rec = _child(args.child, args.runs, args.threads, str(args.onnx), str(args.child_model))
        args.child_out.write_text(json.dumps(rec), encoding="utf-8")
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        return fail(f"--backends: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS)}")
    from common.core.atomic import atomic_write_json
    from common.core.errors import InputError
    from common.inference.model_cache import ensure_onnx, model_record, prepare_model
    from common.records.results import new_result
    from common.runs.efficiency import efficiency_record

    try:
        spec = prepare_model(args.weights)
        onnx = ensure_onnx(spec, args.onnx)
    except (InputError, OSError, RuntimeError) as exc:
        return fail(exc)
    args.onnx, args.child_model = onnx, spec.folder  # the children load the same weights and graph
    eff = efficiency_record(onnx, spec.patch_size, args.threads)
    print(f"tile {spec.patch_size}: {eff['tile_flops'] / 1e12:.3f} TFLOP; peak {eff['peak_gflops']:.0f} GFLOPS "
          f"({eff['limit_kernel']}) on {args.threads} threads -> limit {eff['limit_s_per_tile']:.2f} s per tile")
    records = []
    for b in backends:
        rec = _run_child(b, args)
        if "error" not in rec:
            rec["x_limit"] = rec["median_s"] / eff["limit_s_per_tile"]
            ops = ", ".join(f"{o['op']} {o['seconds']:.2f}" for o in rec["ops"][:5])
            print(f"{b:>14}: {rec['median_s']:.2f} s per tile [{rec['min_s']:.2f}-{rec['max_s']:.2f}], "
                  f"{rec['x_limit']:.2f}x the limit, peak RSS {rec['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"{statistics.median(rec['page_faults_per_call']):.0f} page faults per call; {ops}")
        else:
            print(f"{b:>14}: FAILED {rec['error']}")
        records.append(rec)
    result = new_result("common/cli/profile_tile.py", method="profile_tile",
                        settings={"runs": args.runs, "threads": args.threads, "backends": backends},
                        model=model_record(spec))
    result["efficiency"] = eff
    result["backends"] = records
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
