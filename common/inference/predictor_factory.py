"""The predictor a run configuration asks for: one ONNX Runtime session or the PyTorch network, built once."""
from __future__ import annotations

from pathlib import Path

from common.core.heap import set_keep_freed_memory
from common.inference.model import ModelSpec
from common.inference.model_cache import ensure_onnx
from common.inference.precision import PrecisionError, is_approximate, require_native
from common.inference.predictors import OnnxPredictor, TorchPredictor
from common.inference.run_config import CHANNELS_LAST, RunConfig
from common.inference.torch_channels_last import ChannelsLastTorchPredictor


def build_predictor(cfg: RunConfig, spec: ModelSpec, onnx_path: Path | None):
    """The predictor for ``cfg``: one ONNX Runtime session or the PyTorch network, created once.

    ``onnx_path`` is the base ONNX file (precise InstanceNorm); the variant ``cfg.onnx_norm`` asks for is
    exported beside it on first use. ``cfg.keep_freed_memory`` is applied here, to the whole process (the
    last predictor built decides it; 05's sweep builds one per configuration). ``cfg.precision`` other than
    float32 (approximate) needs the channels-last backend and a CPU with native bf16: PrecisionError (one
    line) otherwise, before anything is built.
    """
    if is_approximate(cfg.precision) and cfg.backend != CHANNELS_LAST:
        raise PrecisionError(f"--precision {cfg.precision} runs on the {CHANNELS_LAST} backend only, not {cfg.backend}")
    require_native(cfg.precision)
    set_keep_freed_memory(cfg.keep_freed_memory)
    if cfg.backend == "onnxruntime":
        if onnx_path is None:
            raise ValueError("the onnxruntime backend needs an ONNX file")
        return OnnxPredictor(ensure_onnx(spec, onnx_path, precise_norm=cfg.onnx_norm == "precise"), cfg.ort)
    if cfg.backend == "pytorch":
        return TorchPredictor(spec.build_network(), threads=cfg.torch_threads)
    if cfg.backend == CHANNELS_LAST:
        return ChannelsLastTorchPredictor(spec.build_network(), threads=cfg.torch_threads, precision=cfg.precision)
    raise ValueError(f"unknown backend {cfg.backend!r}")
