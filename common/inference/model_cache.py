"""The Task 297 model a run uses: its weights set up once (official or stand-in), its ONNX export cached."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from common.core.paths import DEFAULT_ONNX
from common.inference.model import ModelSpec, load_model_spec


def prepare_model(weights_mode: str = "auto", log: Callable[[str], object] = print) -> ModelSpec:
    """Ensure Task 297 weights exist (official or stand-in) and return their ModelSpec."""
    from common.inference.weights import ensure_task297

    folder = ensure_task297(weights_mode, log=log)
    spec = load_model_spec(folder)
    kind = "STAND-IN (seeded random; timings real, anatomy not)" if spec.is_standin else "official"
    log(f"weights: {kind} — {folder}")
    return spec


def onnx_variant_path(onnx_path: Path, precise_norm: bool) -> Path:
    """The file of an export variant: <name>.onnx (precise InstanceNorm) or <name>_nativenorm.onnx."""
    return onnx_path if precise_norm else onnx_path.with_name(onnx_path.stem + "_nativenorm.onnx")


def ensure_onnx(spec: ModelSpec, onnx_path: Path = DEFAULT_ONNX, log: Callable[[str], object] = print,
                precise_norm: bool = True) -> Path:
    """Export the model to ONNX if the file is missing, stale (other weights) or another variant."""
    from common.inference.onnx_export import export_and_check

    onnx_path = onnx_variant_path(onnx_path, precise_norm)
    meta = onnx_path.with_suffix(".json")
    want_norm = "precise" if precise_norm else "native"
    if onnx_path.exists() and meta.exists():
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            if (info.get("model", {}).get("sha256") == spec.checkpoint_sha256
                    and info.get("instance_norm", "native").startswith(want_norm)):
                return onnx_path
        except json.JSONDecodeError:
            pass
    log(f"exporting the network to {onnx_path} (once per set of weights)")
    export_and_check(spec, onnx_path, precise_norm=precise_norm)
    return onnx_path


def model_record(spec: ModelSpec) -> dict:
    """The model entry of a result file: weights provenance (official/standin, sha256) and label names."""
    return {**spec.provenance(), "labels": {str(k): v for k, v in spec.labels.items()}}
