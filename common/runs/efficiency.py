"""How close inference runs to this machine's compute limit (issues 9 and 27): efficiency = limit / actual per tile.

- ``conv_macs``: the multiply-accumulates of one tile, counted from the ONNX graph (Conv and ConvTranspose,
  which are >99.9 % of the network's arithmetic), with ONNX shape inference on a fixed input shape.
- the peak: this machine's rate for the run's precision, measured now with the fastest kernel available
  (``common.runs.compute_peak``: torch.mm, a channels-last 1x1x1 convolution and the network's 3x3x3
  convolutions through oneDNN); the record names the kernel that won, every candidate's rate, and the
  theoretical float32 ceiling where the clock can be read.
- ``limit_s_per_tile`` = 2 x MACs / peak: the time one tile would take if every FLOP ran at the peak.
  Efficiency = limit / measured inference seconds per tile (network + float16 accumulation, as 06 times its
  "inference" stage); 1.0 would be the peak, 0.8 means 1.25x the limit. A scan above 1.0 ran faster than the
  "peak": that is a measurement error of the peak (a noisy machine), and the scan says so
  (``efficiency_error``) instead of claiming more than 100 %.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from common.runs.compute_peak import machine_peaks


def conv_macs(onnx_path: str | Path, input_shape: Sequence[int]) -> dict:
    """Multiply-accumulates of the Conv/ConvTranspose nodes of the ONNX model for one input of
    ``input_shape`` (N, C, D0, D1, D2) in voxels. Returns {"macs", "flops" (= 2 x macs), "n_conv",
    "input_shape"}. Raises ValueError when a convolution's shapes cannot be inferred."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"{onnx_path}: input has {len(dims)} dimensions, not {len(input_shape)}")
    for d, n in zip(dims, input_shape, strict=True):  # fix the dynamic axes so that every shape is known
        d.ClearField("dim_param")
        d.dim_value = int(n)
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = 0
    n_conv = 0
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = weights.get(node.input[1]) or shapes.get(node.input[1])
        # Conv: every output voxel of every output channel sums C_in/groups x kernel products;
        # ConvTranspose: every input voxel of every input channel scatters C_out/groups x kernel products
        shape = shapes.get(node.output[0] if node.op_type == "Conv" else node.input[0])  # N, C, spatial
        if not w or not shape or any(v is None for v in [*w, *shape]):
            raise ValueError(f"{onnx_path}: shapes of {node.op_type} {node.name!r} unknown after shape inference")
        macs += math.prod(shape) * math.prod(w[1:])
        n_conv += 1
    return {"macs": float(macs), "flops": 2.0 * macs, "n_conv": n_conv, "input_shape": list(input_shape)}


def efficiency_record(onnx_path: str | Path, patch_size_zyx: Sequence[int], threads: int,
                      precision: str = "float32", full: bool = True) -> dict:
    """The result JSON's "efficiency" record: tile MACs/FLOPs from the graph, this machine's peaks measured now
    (float32, bf16, int8: ``common.runs.compute_peak``; ``full=False`` times small kernels only, for tests),
    and the compute limit per tile in seconds at the peak of ``precision`` (the run's network precision):
    {"tile_macs", "tile_flops", "n_conv", "patch_size_zyx", "precision", "peak_gflops", "limit_kernel",
    "limit_source", "limit_s_per_tile", "peaks", "theoretical_float32", "above_theoretical"}."""
    count = conv_macs(onnx_path, (1, 1, *patch_size_zyx))
    measured = machine_peaks(threads, full=full)
    peak = measured["peaks"][precision]
    if not peak["gflops"]:
        raise RuntimeError(f"no {precision} kernel ran on this machine: "
                           + "; ".join(f"{r['kernel']}: {r.get('error')}" for r in peak["kernels"]))
    return {"tile_macs": count["macs"], "tile_flops": count["flops"], "n_conv": count["n_conv"],
            "patch_size_zyx": list(patch_size_zyx), "precision": precision, "peak_gflops": peak["gflops"],
            "limit_kernel": peak["kernel"],
            "limit_source": f"measured: {peak['kernel']} ({precision}, {peak['threads']} threads, best of "
                            f"{peak['repeats']})",
            "limit_s_per_tile": count["flops"] / (peak["gflops"] * 1e9), **measured}


def scan_efficiency(inference_s: float | None, n_tiles: int | None, limit_s_per_tile: float | None) -> dict:
    """{"inference_s_per_tile", "efficiency"} of one scan (None where a figure is missing), plus
    "efficiency_error" (one line) when the scan ran faster than the limit: the measured peak was too low."""
    if not inference_s or not n_tiles or n_tiles <= 0:
        return {"inference_s_per_tile": None, "efficiency": None}
    per_tile = inference_s / n_tiles
    out = {"inference_s_per_tile": per_tile, "efficiency": limit_s_per_tile / per_tile if limit_s_per_tile else None}
    if out["efficiency"] is not None and out["efficiency"] > 1.0:
        out["efficiency_error"] = (f"measurement error: {per_tile:.3f} s per tile is faster than the compute limit "
                                   f"({limit_s_per_tile:.3f} s); the peak was measured too low (a busy machine?)")
    return out


EFFICIENCY_HELP = ("for benchmarking: measure this machine's float32, bf16 and int8 peaks (those it runs natively) "
                   "with the fastest kernel available (about 15 s), count the tile's FLOPs from the ONNX graph, and record inference "
                   "seconds per tile and efficiency (compute limit / actual) per scan; 07 reports them")


def measure_into(result: dict, onnx_path: str | Path, patch_size_zyx: Sequence[int], threads: int,
                 precision: str = "float32", full: bool = True) -> str:
    """Put ``efficiency_record`` into ``result["efficiency"]``; return a one-line summary to print."""
    eff = result["efficiency"] = efficiency_record(onnx_path, patch_size_zyx, threads, precision, full)
    return (f"compute limit: {eff['tile_flops'] / 1e12:.3f} TFLOP per tile at {eff['peak_gflops']:.0f} "
            f"GFLOPS ({eff['limit_kernel']}, {precision}, {threads} threads) = {eff['limit_s_per_tile']:.2f} s "
            "per tile")


def add_scan_efficiencies(result: dict) -> None:
    """When ``result`` holds an "efficiency" record: each ok scan gets "inference_s_per_tile" (its median
    inference stage / its tiles) and "efficiency"."""
    eff = result.get("efficiency")
    if not eff:
        return
    for s in result["scans"]:
        if s.get("status") == "ok" and s.get("median"):
            s.update(scan_efficiency(s["median"]["stages"].get("inference"), s.get("n_tiles"),
                                     eff["limit_s_per_tile"]))
