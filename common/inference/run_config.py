"""Run configuration (backend + session + pipeline options) and one timed scan, shared by 04, 05 and 06."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.core.atomic import atomic_write_json
from common.core.errors import InputError
from common.imaging.official_output import official_header
from common.imaging.validation import load_scan
from common.imaging.volume import Volume, save_labels
from common.inference.config_schema import CONFIG_SCHEMA, RunConfigDoc, read_config_document
from common.inference.pipeline import SegmentOptions, SegmentResult, segment
from common.inference.predictors import OnnxPredictor, OrtSettings, TorchPredictor
from common.inference.torch_channels_last import BACKEND as CHANNELS_LAST
from common.inference.torch_channels_last import ChannelsLastTorchPredictor


@dataclass
class RunConfig:
    """Everything that decides how a scan is segmented: backend, its settings, pipeline options."""

    backend: str = "onnxruntime"              # or "pytorch", "pytorch_channels_last" (common.inference.config_schema.BACKENDS)
    ort: OrtSettings = field(default_factory=OrtSettings)
    onnx_norm: str = "precise"                # ONNX export variant: "precise" or "native" InstanceNorm
    torch_threads: int = 0                    # 0 = torch's default (one per physical core)
    keep_freed_memory: bool = False           # glibc keeps freed memory for reuse (common.core.heap): faster, more RSS
    segment: SegmentOptions = field(default_factory=SegmentOptions)
    name: str = "default"

    @classmethod
    def fastest_exact(cls) -> RunConfig:
        """The fastest configuration with the official arithmetic known on a 2-core x86 CPU (06's and the
        console's default when no 05 result exists): nnU-Net's PyTorch network run channels-last on oneDNN
        (common.inference.torch_channels_last) with glibc keeping freed memory (common.core.heap), faithful pipeline options.
        Per 112x112x128 tile on 2 threads it took 3.45-3.98 s against 5.50-6.59 s for ONNX Runtime and
        5.81 s for the plain PyTorch network (python -m common.cli.profile_tile, two runs; PERFORMANCE.md). 05
        re-measures it on each machine."""
        return cls(backend=CHANNELS_LAST, keep_freed_memory=True,
                   name="built-in fastest exact (PyTorch channels-last on oneDNN, freed memory kept)")

    @classmethod
    def fastest_exact_onnx(cls) -> RunConfig:
        """The fastest exact ONNX Runtime configuration (for ONNX Runtime's other providers, e.g. CUDA):
        graph optimisation disabled (the precise-InstanceNorm export runs faster without the optimizer's
        layout rewrites), memory pattern off (same speed, 1.2 GB less peak), faithful pipeline options."""
        return cls(ort=OrtSettings(graph_optimization="disable", mem_pattern=False),
                   name="built-in fastest exact ONNX Runtime (graph optimisation disabled, memory pattern off)")

    @property
    def threads(self) -> int:
        """The backend's configured thread count (0: the library's default)."""
        return self.ort.intra_op_threads if self.backend == "onnxruntime" else self.torch_threads

    def to_dict(self) -> dict[str, Any]:
        return {"schema": CONFIG_SCHEMA, "schema_version": 1, "name": self.name, "backend": self.backend,
                "ort": self.ort.to_dict(), "onnx_norm": self.onnx_norm, "torch_threads": self.torch_threads,
                "keep_freed_memory": self.keep_freed_memory, "segment": self.segment.to_dict()}

    @classmethod
    def from_document(cls, doc: RunConfigDoc) -> RunConfig:
        """The configuration a checked run-configuration file (common.inference.config_schema) describes."""
        return cls(backend=doc.backend, ort=OrtSettings(**doc.ort.model_dump()), onnx_norm=doc.onnx_norm,
                   torch_threads=doc.torch_threads, keep_freed_memory=doc.keep_freed_memory,
                   segment=SegmentOptions(**doc.segment.model_dump()), name=doc.name)


def save_config(cfg: RunConfig, path: Path, extra: dict[str, Any] | None = None) -> Path:
    return atomic_write_json(path, {**cfg.to_dict(), **(extra or {})})


def load_config(path: Path) -> RunConfig:
    """Read a run configuration (05's optimized_config.json or save_config's output); InputError (one line)
    when it is unreadable, another schema, or holds an unknown key or an invalid value (common.inference.config_schema)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable run configuration ({exc})") from exc
    try:
        doc = read_config_document(d)
    except ValueError as exc:
        raise InputError(path, f"invalid run configuration: {exc}") from None
    return RunConfig.from_document(doc)


def build_predictor(cfg: RunConfig, spec, onnx_path: Path | None):
    """The predictor for ``cfg``: one ONNX Runtime session or the PyTorch network, created once.

    ``onnx_path`` is the base ONNX file (precise InstanceNorm); the variant ``cfg.onnx_norm`` asks for is
    exported beside it on first use. ``cfg.keep_freed_memory`` is applied here, to the whole process (the
    last predictor built decides it; 05's sweep builds one per configuration).
    """
    from common.core.heap import set_keep_freed_memory

    set_keep_freed_memory(cfg.keep_freed_memory)
    if cfg.backend == "onnxruntime":
        if onnx_path is None:
            raise ValueError("the onnxruntime backend needs an ONNX file")
        from common.inference.model_cache import ensure_onnx

        return OnnxPredictor(ensure_onnx(spec, onnx_path, precise_norm=cfg.onnx_norm == "precise"), cfg.ort)
    if cfg.backend == "pytorch":
        return TorchPredictor(spec.build_network(), threads=cfg.torch_threads)
    if cfg.backend == CHANNELS_LAST:
        return ChannelsLastTorchPredictor(spec.build_network(), threads=cfg.torch_threads)
    raise ValueError(f"unknown backend {cfg.backend!r}")


@dataclass
class ScanRun:
    """One timed run of one scan: stage seconds, the segmentation and the loaded volume."""

    stages: dict[str, float]
    total_s: float
    result: SegmentResult
    volume: Volume
    warnings: list[str]


def run_scan(path: Path, spec, predictor, options: SegmentOptions, mask_path: Path | None = None,
             progress=None) -> ScanRun:
    """Load + validate, segment, save the mask (atomically) — each stage timed in seconds."""
    t0 = time.perf_counter()
    vol, warnings = load_scan(path)
    check_extent_for(vol, spec)
    check_memory_for(vol, spec)
    t1 = time.perf_counter()
    res = segment(vol.image, spec, predictor, options, progress=progress)
    t2 = time.perf_counter()
    if mask_path is not None:
        save_labels(np.asanyarray(res.labels.dataobj), vol.affine, mask_path, header=official_header(vol.image))
    t3 = time.perf_counter()
    stages = {"load": t1 - t0, **res.timings, "save": t3 - t2}
    return ScanRun(stages=stages, total_s=t3 - t0, result=res, volume=vol, warnings=warnings)


def check_extent_for(vol: Volume, spec) -> None:
    """Refuse (InputError, one line) a scan that covers less than one model voxel (3 mm) along an axis: the
    resampled grid would be empty (typically a header whose voxel size is in the wrong unit, e.g. 0.001 mm)."""
    from common.imaging.validation import AXES

    for axis, n, mm, target in zip(AXES, vol.shape[:3], vol.spacing[:3], spec.spacing_xyz, strict=True):
        if n * mm < target:
            raise InputError(vol.path, f"scan covers only {n * mm:.4g} mm along {axis} ({n} voxels of {mm:.4g} mm), "
                                       f"less than one {target:g} mm model voxel; check the voxel size in the header")


def check_memory_for(vol: Volume, spec) -> None:
    """Refuse (InputError, one line) a scan whose estimated peak memory exceeds the free RAM, before the
    pipeline allocates it, instead of being killed by the kernel half-way."""
    from common.imaging.validation import check_memory, estimate_memory_bytes

    patch_xyz = tuple(reversed([spec.patch_size[i] for i in spec.transpose_backward]))
    est = estimate_memory_bytes(vol.shape[:3], vol.spacing[:3], spec.spacing_xyz, spec.num_classes, patch_xyz)
    check_memory(vol.path, est)


def labels_present(labels: np.ndarray) -> list[int]:
    """Non-zero label ids present in a label map (names are in the result's model["labels"])."""
    return [int(i) for i in np.flatnonzero(np.bincount(labels.ravel().astype(np.int64))) if i != 0]


def mask_path_for(out_dir: Path, scan_id: str) -> Path:
    """The mask of the scan whose batch id is ``scan_id`` (common.imaging.discovery)."""
    return Path(out_dir) / f"{scan_id}_seg.nii.gz"
