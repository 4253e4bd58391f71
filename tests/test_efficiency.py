"""Issue 9's efficiency figures: tile FLOPs counted from the ONNX graph equal an independent count on the
PyTorch network (forward hooks), and 06 --efficiency records the GEMM peak, the limit and each scan's
inference seconds per tile and efficiency consistently."""
from __future__ import annotations

import importlib
import math

import nibabel as nib
import pytest
import torch

from common.inference.run_config import RunConfig, save_config
from common.records.results import read_result
from common.runs.efficiency import conv_macs


def _hook_macs(net: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """MACs of every Conv3d/ConvTranspose3d in one forward pass of zeros of ``shape`` (N, C, D0, D1, D2)."""
    total = 0

    def hook(mod, inputs, output):
        nonlocal total
        k = math.prod(mod.kernel_size)
        if isinstance(mod, torch.nn.ConvTranspose3d):  # every input voxel scatters C_out/groups x kernel
            total += inputs[0].numel() * mod.out_channels // mod.groups * k
        else:  # every output voxel gathers C_in/groups x kernel
            total += output.numel() * mod.in_channels // mod.groups * k

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)]
    try:
        with torch.no_grad():
            net(torch.zeros(shape))
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize("spatial", [(32, 32, 32), (64, 32, 32)])
def test_graph_count_equals_the_network_count(tiny_standin_home, tiny_onnx_model, spatial):
    from common.inference.model import load_model_spec
    from common.inference.weights import standin_folder

    net = load_model_spec(standin_folder(tiny_standin_home)).build_network().eval()
    shape = (1, 1, *spatial)
    counted = conv_macs(tiny_onnx_model, shape)
    assert counted["macs"] == _hook_macs(net, shape) and counted["flops"] == 2 * counted["macs"]
    assert counted["n_conv"] > 10


@pytest.mark.slow
def test_06_records_efficiency_per_scan(tmp_path, example_ct_sm, tiny_onnx_model, in_tiny_home, capsys):
    scan = tmp_path / "ct.nii.gz"
    nib.save(nib.load(example_ct_sm).slicer[20:100, 20:80, 0:30], scan)
    cfg = save_config(RunConfig.fastest_exact(), tmp_path / "config.json")
    s06 = importlib.import_module("06_inferenceAndPassport")
    assert s06.main(["--input", str(scan), "--out", str(tmp_path / "o"), "--result", str(tmp_path / "r.json"),
                     "--onnx", str(tiny_onnx_model), "--config", str(cfg), "--weights", "standin", "--no-passport",
                     "--efficiency"]) == 0, capsys.readouterr().err
    res = read_result(tmp_path / "r.json")
    eff = res["efficiency"]
    assert eff["tile_flops"] == conv_macs(tiny_onnx_model, (1, 1, 32, 32, 32))["flops"]
    assert eff["gemm_peak_gflops"] > 0 and eff["gemm"]["threads"] >= 1
    assert eff["limit_s_per_tile"] == pytest.approx(eff["tile_flops"] / (eff["gemm_peak_gflops"] * 1e9))
    (rec,) = res["scans"]
    assert rec["n_tiles"] > 1
    assert rec["inference_s_per_tile"] == pytest.approx(rec["median"]["stages"]["inference"] / rec["n_tiles"])
    assert rec["efficiency"] == pytest.approx(eff["limit_s_per_tile"] / rec["inference_s_per_tile"])
    assert "s per tile, efficiency" in capsys.readouterr().out


@pytest.mark.slow
def test_04_records_efficiency_per_scan(tmp_path, example_ct_sm, tiny_onnx_model, in_tiny_home, capsys):
    scan = tmp_path / "ct.nii.gz"
    nib.save(nib.load(example_ct_sm).slicer[20:100, 20:80, 0:30], scan)
    s04 = importlib.import_module("04_onnx_benchmark")
    assert s04.main(["--input", str(scan), "--out", str(tmp_path / "o"), "--result", str(tmp_path / "r.json"),
                     "--onnx", str(tiny_onnx_model), "--weights", "standin", "--repeats", "1", "--warmup", "0",
                     "--efficiency"]) == 0, capsys.readouterr().err
    res = read_result(tmp_path / "r.json")
    (rec,) = res["scans"]
    assert rec["inference_s_per_tile"] == pytest.approx(rec["median"]["stages"]["inference"] / rec["n_tiles"])
    assert rec["efficiency"] == pytest.approx(res["efficiency"]["limit_s_per_tile"] / rec["inference_s_per_tile"])
