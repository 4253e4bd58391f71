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
from common.runs.compute_peak import measure_peak
from common.runs.efficiency import conv_macs, scan_efficiency


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
    assert eff["peak_gflops"] > 0 and eff["peaks"]["float32"]["threads"] >= 1
    assert eff["peak_gflops"] == max(k["gflops"] for k in eff["peaks"]["float32"]["kernels"] if "gflops" in k)
    assert eff["limit_kernel"] in eff["limit_source"]
    assert eff["limit_s_per_tile"] == pytest.approx(eff["tile_flops"] / (eff["peak_gflops"] * 1e9))
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


def test_the_peak_is_the_fastest_kernel_and_names_it():
    rec = measure_peak("float32", threads=1, repeats=1, full=False)
    timed = [k for k in rec["kernels"] if "gflops" in k]
    assert len(timed) >= 3 and any("oneDNN channels-last conv" in k["kernel"] for k in timed)
    best = max(timed, key=lambda k: k["gflops"])
    assert (rec["gflops"], rec["kernel"]) == (best["gflops"], best["kernel"])
    with pytest.raises(ValueError, match="unknown precision"):
        measure_peak("float8", threads=1)


def test_a_precision_without_native_instructions_is_not_timed(monkeypatch):
    """On a CPU without native bf16 / int8 (a Zen 2 EPYC: AVX2 only) their kernels are emulated, hundreds of times
    slower: timing them took over 10 minutes there. Simulate that CPU: nothing is timed, the record says why."""
    import common.runs.compute_peak as cp

    monkeypatch.setattr(cp, "native_isa", lambda precision: "AVX2" if precision == "float32" else None)
    monkeypatch.setattr(cp, "_best_seconds", lambda *a: pytest.fail("a kernel was timed"))
    for precision in ("bf16", "int8"):
        rec = cp.measure_peak(precision, threads=1, repeats=1, full=False)
        assert rec["gflops"] is None and rec["kernels"] == [] and rec["native_isa"] is None
        assert rec["skipped"].startswith(f"not timed: this CPU has no native {precision}")


def test_native_instruction_sets_follow_the_cpu_flags(monkeypatch):
    import common.inference.precision as precision
    import common.runs.compute_peak as cp

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma", "avx_vnni"})
    assert cp.native_isa("int8") == "AVX_VNNI"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    assert cp.native_isa("int8") is None
    assert cp.native_isa("float32")  # always runs: torch's CPU capability names the vector ISA


def test_above_the_limit_is_flagged_as_a_measurement_error():
    slow = scan_efficiency(inference_s=8.0, n_tiles=4, limit_s_per_tile=1.0)  # 2 s per tile against 1 s
    assert slow["efficiency"] == pytest.approx(0.5) and "efficiency_error" not in slow
    fast = scan_efficiency(inference_s=2.0, n_tiles=4, limit_s_per_tile=1.0)  # 0.5 s per tile: "200 %"
    assert fast["efficiency"] == pytest.approx(2.0) and fast["efficiency_error"].startswith("measurement error")
