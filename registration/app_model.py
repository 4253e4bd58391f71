"""The model behind the clinical app (registration/clinical_app.py): the weights, the run configuration and one
predictor, chosen exactly as 06 and totalseg-fast choose them, and a predictor wrapper that reports tiles done.

Nothing here imports streamlit: the app caches ``load_weights`` and ``build_session`` once per server process
(st.cache_resource); tests call them directly.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.inference.model import ModelSpec

PASSPORT_RESOLUTION, MAX_POINTS = "model", 500  # 06's defaults: its resume keys are ours


@dataclass
class ModelSession:
    """``spec`` (weights), ``cfg`` (RunConfig), ``predictor`` (built once), ``key_config`` (06's resume-key part
    for its default options), ``lock``: one segmentation at a time on the shared predictor; ``notes``: the lines
    said while setting up (weights kind, ONNX export)."""

    spec: ModelSpec
    cfg: Any
    config_file: Path | None
    predictor: Any
    key_config: dict
    lock: threading.Lock = field(default_factory=threading.Lock)
    notes: list[str] = field(default_factory=list)


def load_weights(mode: str = "auto") -> tuple[ModelSpec, list[str]]:
    """The Task 297 ModelSpec for ``mode`` ("auto" | "official" | "standin", as --weights) and the lines said while
    finding the weights (e.g. why the stand-in is used). RuntimeError/InputError: one line."""
    from common.inference.model_cache import prepare_model

    notes: list[str] = []
    return prepare_model(mode, log=notes.append), notes


def build_session(spec: ModelSpec, config: Path | None = None) -> ModelSession:
    """The run configuration 06 would use (``config``, else 05's benchmarks/optimized_config.json when present,
    else RunConfig.fastest_exact) and its predictor, built once."""
    from common.core.paths import DEFAULT_ONNX, OPTIMIZED_CONFIG
    from common.inference.model_cache import ensure_onnx
    from common.inference.predictor_factory import build_predictor
    from common.inference.run_config import RunConfig, load_config
    from common.records import resume

    notes: list[str] = []
    cfg_path = config or (OPTIMIZED_CONFIG if OPTIMIZED_CONFIG.exists() else None)
    cfg = load_config(cfg_path) if cfg_path else RunConfig.fastest_exact()
    onnx = ensure_onnx(spec, DEFAULT_ONNX, log=notes.append) if cfg.backend == "onnxruntime" else None
    predictor = build_predictor(cfg, spec, onnx)
    key_config = resume.config_key(cfg.to_dict(), passport_resolution=PASSPORT_RESOLUTION, max_points=MAX_POINTS,
                                   no_passport=False)
    notes.append(f"configuration: {cfg.name} ({cfg_path or 'built-in fastest exact'}), backend {cfg.backend}")
    return ModelSession(spec, cfg, cfg_path, predictor, key_config, notes=notes)


class CountingPredictor:
    """``predictor`` that calls ``on_tiles(n)`` after each batch of n tiles it computed: the same arithmetic (the
    wrapped predictor does the work, ``tile_logits`` included, common.inference.sliding_window._tile_logits)."""

    def __init__(self, predictor: Any, on_tiles: Callable[[int], None]):
        self._inner, self._on_tiles = predictor, on_tiles

    def __call__(self, batch):
        out = self._inner(batch)
        self._on_tiles(len(batch))
        return out

    def __getattr__(self, name: str) -> Any:
        if name == "tile_logits":
            inner = self._inner.tile_logits  # AttributeError when the predictor has none

            def tile_logits(batch):
                out = inner(batch)
                self._on_tiles(len(batch))
                return out

            return tile_logits
        return getattr(self._inner, name)


def expected_tiles(scan: Path, spec: ModelSpec, step: float) -> int | None:
    """Tiles the pipeline will run on a NIfTI scan, from its header alone (common.inference.tile_count); None for
    DICOM or an unreadable header (the progress then counts without a total)."""
    from common.imaging.scan_paths import is_nifti_path

    if not (Path(scan).is_file() and is_nifti_path(scan)):
        return None
    try:
        import nibabel as nib

        from common.inference.tile_count import tiles_for_scan

        img = nib.load(str(scan))
        return tiles_for_scan(img.shape[:3], img.header.get_zooms()[:3], spec,
                              orientation="".join(nib.aff2axcodes(img.affine)), step=step)
    except Exception:  # a bad header fails later, with its own one-line error
        return None
