"""Predictors behind one interface: ``predictor(batch)`` maps float32 (B, 1, *patch) -> (B, K, *patch) logits.

ONNX Runtime sessions are tuned here (threads, graph optimisation level, execution mode, providers);
the PyTorch network sits behind the same call for parity checks and as an alternative backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.inference.run_config import OrtSettings

GRAPH_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}


class OnnxPredictor:
    """One ONNX Runtime session, created once and reused for every tile of every scan."""

    backend = "onnxruntime"

    def __init__(self, model_path: str | Path, settings: OrtSettings | None = None,
                 profile_prefix: str | Path | None = None):
        """``profile_prefix``: turn on ONNX Runtime's profiler, its trace written as <prefix>_<date>.json
        (``self.session.end_profiling()`` returns the file); for common.cli.profile_tile, not a run setting."""
        import onnxruntime as ort

        self.settings = settings or OrtSettings()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.settings.intra_op_threads
        so.inter_op_num_threads = self.settings.inter_op_threads
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_LEVELS[self.settings.graph_optimization])
        so.enable_mem_pattern = self.settings.mem_pattern
        so.enable_cpu_mem_arena = self.settings.cpu_mem_arena
        if profile_prefix is not None:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if self.settings.execution_mode == "parallel"
                             else ort.ExecutionMode.ORT_SEQUENTIAL)
        available = ort.get_available_providers()
        providers = [p for p in self.settings.providers if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.model_path = Path(model_path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": str(self.model_path), **self.settings.to_dict(),
                "providers_used": self.session.get_providers()}


_TORCH_DEFAULT_THREADS: int | None = None


def set_torch_threads(threads: int) -> None:
    """torch's intra-op threads for the predictor built next: ``threads`` (> 0), else torch's own default (as
    found before the first predictor of this process changed it). The setting is process-wide, so every
    predictor sets it, and one configuration's threads never leak into the next (05's sweep builds many).
    torch's float32 results depend on the thread count in their last bits (oneDNN blocks its work by it)."""
    import torch

    global _TORCH_DEFAULT_THREADS
    if _TORCH_DEFAULT_THREADS is None:
        _TORCH_DEFAULT_THREADS = torch.get_num_threads()
    torch.set_num_threads(threads if threads > 0 else _TORCH_DEFAULT_THREADS)


class TorchPredictor:
    """The PyTorch network (nnU-Net's own module) behind the predictor interface, CPU, inference mode."""

    backend = "pytorch"

    def __init__(self, network, threads: int = 0):
        import torch

        self.torch = torch
        self.network = network.eval()
        self.threads = threads
        set_torch_threads(threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.network(self.torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return out.numpy()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "threads": self.torch.get_num_threads()}
