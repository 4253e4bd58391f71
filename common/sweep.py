"""05's search for the fastest faithful configuration: candidate configurations and the selection rule."""
from __future__ import annotations

import copy
from dataclasses import replace

from common.runner import RunConfig
from common.session import usable_cores

AGREEMENT_THRESHOLD = 0.999


def one_factor_configs(cores: int | None = None) -> list[RunConfig]:
    """The baseline (faithful pipeline, ONNX Runtime defaults) and one variation per factor.

    Factors: backend (ONNX Runtime / PyTorch, with thread counts 1..cores), graph optimisation level,
    execution mode, resampling order (1 vs 3), tile step (0.5, the official 0.8, 1.0), float32 vs float16
    logit sums, tiles per predictor call, threads for the resampling steps.
    """
    cores = cores or usable_cores()
    base = RunConfig(name="baseline: ort defaults")
    out = [base]

    def vary(name: str, **changes) -> None:
        cfg = copy.deepcopy(base)
        for key, value in changes.items():
            if key.startswith("ort_"):
                setattr(cfg.ort, key[4:], value)
            elif key in ("backend", "torch_threads", "onnx_norm"):
                setattr(cfg, key, value)
            else:
                cfg.segment = replace(cfg.segment, **{key: value})
        cfg.name = name
        out.append(cfg)

    for t in sorted({1, cores}):
        vary(f"ort intra_op_threads={t}", ort_intra_op_threads=t)
        vary(f"pytorch threads={t}", backend="pytorch", torch_threads=t)
    for level in ("disable", "basic", "extended"):
        vary(f"ort graph_optimization={level}", ort_graph_optimization=level)
    vary("ort execution_mode=parallel", ort_execution_mode="parallel")
    vary("onnx_norm=native (fused ORT InstanceNorm)", onnx_norm="native")
    vary("resample_order=3", resample_order=3)
    for step in (0.5, 1.0):
        vary(f"tile_step={step}", tile_step=step)
    vary("accumulate=float32", accumulate="float32")
    vary("batch_size=2", batch_size=2)
    if cores > 1:
        vary(f"resample_threads={cores}", resample_threads=cores)
    return out


def combine(best: dict[str, RunConfig]) -> RunConfig:
    """One configuration from the winning value of each factor (backend first, then pipeline options)."""
    backend_cfg = best.get("backend") or RunConfig()
    cfg = copy.deepcopy(backend_cfg)
    for factor in ("accumulate", "batch_size", "resample_threads"):
        if factor in best:
            setattr(cfg.segment, factor, getattr(best[factor].segment, factor))
    if cfg.backend == "onnxruntime":
        if "onnx_norm" in best:
            cfg.onnx_norm = best["onnx_norm"].onnx_norm
        for factor in ("graph_optimization", "execution_mode"):
            if factor in best:
                setattr(cfg.ort, factor, getattr(best[factor].ort, factor))
    cfg.name = "combined best factors"
    return cfg


def factor_of(cfg: RunConfig) -> str:
    """Which factor a one-factor configuration varies (by its name)."""
    name = cfg.name
    if name.startswith(("ort intra_op_threads", "pytorch threads")):
        return "backend"
    for key in ("onnx_norm", "graph_optimization", "execution_mode", "resample_order", "tile_step", "accumulate",
                "batch_size", "resample_threads"):
        if key in name:
            return key
    return "baseline"


def select_fastest(rows: list[dict], threshold: float = AGREEMENT_THRESHOLD) -> dict | None:
    """Fastest row (by summed median seconds over the sweep scans) whose agreement with the reference is
    >= threshold on EVERY sweep scan; None if no row qualifies. Rows: {"seconds": [...], "agreement": [...]}."""
    ok = [r for r in rows if r["agreement"] and min(r["agreement"]) >= threshold and not r.get("error")]
    return min(ok, key=lambda r: sum(r["seconds"])) if ok else None


