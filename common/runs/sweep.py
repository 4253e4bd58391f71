"""05's search for the fastest faithful configuration: candidate configurations, timed rows and the selection rule."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from common.core.machine import usable_cores
from common.inference.precision import native_bf16
from common.inference.run_config import CHANNELS_LAST, RunConfig

AGREEMENT_THRESHOLD = 0.999
FACTORS = ("backend", "onnx_norm", "graph_optimization", "execution_mode", "resample_order", "tile_step", "accumulate",
           "batch_size", "resample_threads", "keep_freed_memory")
APPROXIMATE_FACTORS = ("precision",)  # swept only with 05 --allow-approximate (common.inference.precision)


@dataclass(frozen=True)
class Candidate:
    """A configuration of the sweep and the factor it varies ("baseline", "backend", "tile_step", ...: FACTORS)."""

    factor: str
    config: RunConfig


@dataclass
class SweepRow:
    """One configuration timed on the sweep scans: per scan, the median seconds of ``runs`` timed runs, its stage
    seconds and its voxel agreement (0..1) with the reference; ``error``: why it could not run (one line)."""

    config: RunConfig
    factor: str
    scans: list[str]
    runs: int = 1
    seconds: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def to_json(self) -> dict[str, Any]:
        """The row as 05's result file holds it ("sweep" and "finalists")."""
        return {"name": self.name, "config": self.config.to_dict(), "scans": self.scans, "seconds": self.seconds,
                "stages": self.stages, "agreement": self.agreement, "runs": self.runs, "error": self.error,
                "factor": self.factor}


def one_factor_configs(cores: int | None = None, allow_approximate: bool = False) -> list[Candidate]:
    """The baseline (faithful pipeline, ONNX Runtime defaults) and one variation per factor.

    Factors: backend (ONNX Runtime / PyTorch / PyTorch channels-last on oneDNN, with thread counts 1..cores),
    graph optimisation level, execution mode, resampling order (1 vs 3), tile step (0.5, the official 0.8,
    1.0), float32 vs float16 logit sums, tiles per predictor call, threads for the resampling steps, glibc
    keeping freed memory (common.core.heap). With ``allow_approximate`` (05 --allow-approximate) and a CPU
    with native bf16, also the approximate factor "precision": the channels-last network in bf16 on all cores.
    """
    cores = cores or usable_cores()
    base = RunConfig(name="baseline: ort defaults")
    out = [Candidate("baseline", base)]

    def vary(factor: str, name: str, **changes) -> None:
        cfg = copy.deepcopy(base)
        for key, value in changes.items():
            if key.startswith("ort_"):
                setattr(cfg.ort, key[4:], value)
            elif key in ("backend", "torch_threads", "onnx_norm", "keep_freed_memory", "precision"):
                setattr(cfg, key, value)
            else:
                cfg.segment = cfg.segment.model_copy(update={key: value})
        cfg.name = name
        out.append(Candidate(factor, cfg))

    for t in sorted({1, cores}):
        vary("backend", f"ort intra_op_threads={t}", ort_intra_op_threads=t)
        vary("backend", f"pytorch threads={t}", backend="pytorch", torch_threads=t)
        vary("backend", f"pytorch channels-last threads={t}", backend=CHANNELS_LAST, torch_threads=t)
    for level in ("disable", "basic", "extended"):
        vary("graph_optimization", f"ort graph_optimization={level}", ort_graph_optimization=level)
    vary("execution_mode", "ort execution_mode=parallel", ort_execution_mode="parallel")
    vary("onnx_norm", "onnx_norm=native (fused ORT InstanceNorm)", onnx_norm="native")
    vary("resample_order", "resample_order=3", resample_order=3)
    for step in (0.5, 1.0):
        vary("tile_step", f"tile_step={step}", tile_step=step)
    vary("accumulate", "accumulate=float32", accumulate="float32")
    vary("batch_size", "batch_size=2", batch_size=2)
    vary("keep_freed_memory", "keep freed memory (glibc heap)", keep_freed_memory=True)
    if cores > 1:
        vary("resample_threads", f"resample_threads={cores}", resample_threads=cores)
    if allow_approximate and native_bf16() is not None:
        vary("precision", f"APPROXIMATE bf16 channels-last threads={cores}", backend=CHANNELS_LAST,
             torch_threads=cores, keep_freed_memory=True, precision="bf16")
    return out


def combine(best: dict[str, RunConfig]) -> RunConfig:
    """One configuration from the winning value of each factor (backend first, then pipeline options)."""
    backend_cfg = best.get("backend") or RunConfig()
    cfg = copy.deepcopy(backend_cfg)
    for factor in ("accumulate", "batch_size", "resample_threads"):
        if factor in best:
            setattr(cfg.segment, factor, getattr(best[factor].segment, factor))
    if "keep_freed_memory" in best:
        cfg.keep_freed_memory = True
    if cfg.backend == "onnxruntime":
        if "onnx_norm" in best:
            cfg.onnx_norm = best["onnx_norm"].onnx_norm
        for factor in ("graph_optimization", "execution_mode"):
            if factor in best:
                setattr(cfg.ort, factor, getattr(best[factor].ort, factor))
    cfg.name = "combined best factors"
    return cfg


def qualifies(row: SweepRow, threshold: float = AGREEMENT_THRESHOLD, allow_approximate: bool = False) -> bool:
    """A row may be chosen: it ran without error, agrees with the reference at >= ``threshold`` on EVERY sweep
    scan, and is exact unless ``allow_approximate``."""
    return (bool(row.agreement) and min(row.agreement) >= threshold and not row.error
            and (allow_approximate or not row.config.approximate))


def select_fastest(rows: list[SweepRow], threshold: float = AGREEMENT_THRESHOLD,
                   allow_approximate: bool = False) -> SweepRow | None:
    """Fastest row (by summed median seconds over the sweep scans) that ``qualifies``: an approximate row only
    with ``allow_approximate``, and then only at >= threshold agreement like any other; None if none does."""
    ok = [r for r in rows if qualifies(r, threshold, allow_approximate)]
    return min(ok, key=lambda r: sum(r.seconds)) if ok else None


