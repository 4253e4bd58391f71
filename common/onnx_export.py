"""Export the network of an nnU-Net v2 results folder to ONNX, and check it against PyTorch."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path
from common.model import ModelSpec

OPSET = 17


def export_onnx(spec: ModelSpec, target: str | Path, opset: int = OPSET) -> Path:
    """Write the network as ONNX with dynamic batch and spatial axes (input 'image', output 'logits')."""
    import torch

    net = spec.build_network()
    dummy = torch.zeros((1, 1, *spec.patch_size), dtype=torch.float32)
    axes = {0: "batch", 2: "d0", 3: "d1", 4: "d2"}
    import warnings

    with atomic_path(target, suffix=".onnx") as tmp, torch.inference_mode(), warnings.catch_warnings():
        # InstanceNorm always normalises with the instance's own statistics; the exporter's "train=True"
        # note about it is expected and harmless.
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        torch.onnx.export(net, (dummy,), str(tmp), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes}, opset_version=opset, dynamo=False)
        import onnx

        onnx.checker.check_model(str(tmp), full_check=True)
    return Path(target)


def compare_backends(spec: ModelSpec, onnx_path: str | Path, seed: int = 0) -> dict[str, Any]:
    """Run one random full patch through PyTorch and ONNX Runtime; max |logit diff| and argmax agreement."""
    import torch

    from common.session import OnnxPredictor, TorchPredictor

    rng = np.random.default_rng(seed)
    patch = rng.standard_normal((1, 1, *spec.patch_size)).astype(np.float32)
    torch_pred = TorchPredictor(spec.build_network())
    ort_pred = OnnxPredictor(onnx_path)
    t0 = time.perf_counter()
    a = torch_pred(patch)
    t1 = time.perf_counter()
    b = ort_pred(patch)
    t2 = time.perf_counter()
    agree = float(np.mean(np.argmax(a, 1) == np.argmax(b, 1)))
    return {"patch_shape": list(patch.shape), "seed": seed, "max_abs_logit_diff": float(np.max(np.abs(a - b))),
            "max_abs_logit": float(np.max(np.abs(a))), "argmax_agreement": agree,
            "pytorch_s": t1 - t0, "onnxruntime_s": t2 - t1, "torch_threads": torch.get_num_threads()}


def export_and_check(spec: ModelSpec, target: str | Path, opset: int = OPSET) -> dict[str, Any]:
    """Export, check with onnx.checker, compare with PyTorch on one full patch; write <target>.json beside it."""
    from common.atomic import atomic_write_json
    from common.machine import library_versions, machine_info
    from common.results import utc_now

    target = Path(target)
    t0 = time.perf_counter()
    export_onnx(spec, target, opset=opset)
    export_s = time.perf_counter() - t0
    check = compare_backends(spec, target)
    report = {"schema": "ts-bench-onnx-export", "schema_version": 1, "created": utc_now(), "onnx": str(target),
              "onnx_bytes": target.stat().st_size, "opset": opset, "export_s": export_s,
              "dynamic_axes": ["batch", "d0", "d1", "d2"], "onnx_checker": "passed",
              "model": spec.provenance(), "patch_size": list(spec.patch_size), "num_classes": spec.num_classes,
              "parity": check, "machine": machine_info(), "versions": library_versions()}
    atomic_write_json(target.with_suffix(".json"), report)
    return report
