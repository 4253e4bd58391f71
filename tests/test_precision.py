"""Issue 27's opt-in bf16 network: it runs, it is labelled approximate in every output (result JSON, console
line, passport provenance), a CPU without native bf16 refuses it in one line (the CPU check simulated), and
05 never picks an approximate candidate without --allow-approximate."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.inference import precision
from common.inference.margins import margin_analysis
from common.inference.run_config import RunConfig, save_config
from common.inference.torch_channels_last import ChannelsLastTorchPredictor
from common.records.results import read_result
from common.runs.sweep import SweepRow, one_factor_configs, select_fastest

NATIVE = precision.native_bf16()
needs_bf16 = pytest.mark.skipif(NATIVE is None, reason="this CPU has no native bf16 (AVX512_BF16 / AMX-BF16)")


@pytest.fixture(scope="module")
def tiny_network(tiny_standin_home):
    from common.inference.model import load_model_spec
    from common.inference.weights import standin_folder

    return load_model_spec(standin_folder(tiny_standin_home)).build_network()


def _ct_like(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.6
    return (np.where(body, 0.2, -4.0) + body * rng.normal(0, 0.5, shape))[None, None].astype(np.float32)


def test_labels_and_config_field():
    assert precision.label("float32") == "exact" and not precision.is_approximate("float32")
    assert precision.label("bf16").startswith("approximate")
    cfg = RunConfig.fastest_exact()
    assert cfg.precision == "float32" and not cfg.approximate
    bf = cfg.with_precision("bf16")
    assert bf.approximate and "approximate" in bf.name and cfg.precision == "float32"  # a copy
    from common.inference.run_config import read_config_document

    assert read_config_document({**cfg.to_dict(), "precision": "bf16"}).config().precision == "bf16"
    with pytest.raises(ValueError, match="precision"):
        read_config_document({**cfg.to_dict(), "precision": "float16"})


@needs_bf16
def test_bf16_network_runs_in_bf16_and_stays_near_float32(tiny_network):
    x = _ct_like((32, 32, 32))
    exact = ChannelsLastTorchPredictor(tiny_network, threads=1)
    approx = ChannelsLastTorchPredictor(tiny_network, threads=1, precision="bf16")
    dtypes = {p.dtype for p in approx.network.parameters()}
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes  # convolutions bf16, norms and head float32
    a, b = exact(x), approx(x)
    assert b.dtype == np.float32 and b.shape == a.shape
    err = np.abs(a - b).max()
    assert 0 < err <= 0.05 * np.abs(a).max()  # rounded, not broken
    assert approx.describe()["approximate"] is True and exact.describe()["approximate"] is False


@needs_bf16
def test_margin_analysis_bounds_the_flips(tiny_network):
    data = _ct_like((40, 36, 36))[0]
    exact = ChannelsLastTorchPredictor(tiny_network, threads=1)
    same = margin_analysis(data, exact, ChannelsLastTorchPredictor(tiny_network, threads=1), (32, 32, 32))
    assert same["max_abs_logit_error"] == 0 and same["fraction_flipped"] == 0
    assert same["fraction_margin_below_max_error"] == 0
    approx = ChannelsLastTorchPredictor(tiny_network, threads=1, precision="bf16")
    rec = margin_analysis(data, exact, approx, (32, 32, 32), max_tiles=2)
    assert rec["tiles"] == 2 and rec["voxels"] == 2 * 32 ** 3
    assert 0 < rec["max_abs_logit_error"] <= rec["max_pair_error"] <= 2 * rec["max_abs_logit_error"]
    # a label can only flip where the exact margin is below the change of the logit differences
    assert rec["fraction_flipped"] <= rec["fraction_margin_below_max_pair_error"]


def test_no_native_bf16_refuses_in_one_line(monkeypatch, model_spec):
    from common.inference.predictor_factory import build_predictor

    monkeypatch.setattr(precision, "native_bf16", lambda: None)  # a CPU without AVX512_BF16 and AMX
    with pytest.raises(precision.PrecisionError) as err:
        build_predictor(RunConfig.fastest_exact().with_precision("bf16"), model_spec, None)
    assert "\n" not in str(err.value) and "no native bfloat16" in str(err.value)
    with pytest.raises(precision.PrecisionError, match="channels_last backend only"):
        build_predictor(RunConfig().with_precision("bf16"), model_spec, None)  # ONNX Runtime: never bf16


def test_06_refuses_bf16_without_native_support(monkeypatch, tmp_path, example_ct_sm, in_tiny_home, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda: None)
    s06 = importlib.import_module("06_inferenceAndPassport")
    code = s06.main(["--input", str(example_ct_sm), "--out", str(tmp_path / "o"), "--result",
                     str(tmp_path / "r.json"), "--weights", "standin", "--precision", "bf16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no native bfloat16" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.nii.gz"))


def test_totalseg_fast_refuses_bf16_without_native_support_in_one_line(monkeypatch, tmp_path, example_ct_sm,
                                                                        in_tiny_home, capsys):
    """The refusal comes before anything else is said on stderr (it once followed the 'approximate' line)."""
    from common.cli.console import main

    monkeypatch.setattr(precision, "native_bf16", lambda: None)
    code = main(["-i", str(example_ct_sm), "-o", str(tmp_path / "segs"), "--weights", "standin", "--precision",
                 "bf16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no native bfloat16" in err, err
    assert not (tmp_path / "segs").exists()


@needs_bf16
@pytest.mark.slow
def test_06_bf16_is_labelled_approximate_everywhere(tmp_path, example_ct_sm, in_tiny_home, capsys, monkeypatch):
    scan = tmp_path / "ct.nii.gz"
    nib.save(nib.load(example_ct_sm).slicer[20:100, 20:80, 0:30], scan)
    cfg = save_config(RunConfig.fastest_exact(), tmp_path / "config.json")
    s06 = importlib.import_module("06_inferenceAndPassport")
    assert s06.main(["--input", str(scan), "--out", str(tmp_path / "o"), "--result", str(tmp_path / "r.json"),
                     "--config", str(cfg), "--weights", "standin", "--precision", "bf16", "--efficiency"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    res = read_result(tmp_path / "r.json")
    assert res["arithmetic"]["approximate"] is True and res["settings"]["config"]["precision"] == "bf16"
    (rec,) = res["scans"]
    assert rec["arithmetic"]["label"].startswith("approximate")
    passport = json.loads(next((tmp_path / "o").glob("*_passport.json")).read_text(encoding="utf-8"))
    assert passport["model"]["arithmetic"]["approximate"] is True
    assert "approximate (bf16 network)" in out and "[approximate" in out  # the configuration and scan lines
    margins = res["approximation"]
    assert margins["tiles"] == 1 and margins["max_abs_logit_error"] > 0
    assert 0 <= margins["fraction_margin_below_max_error"] <= 1
    assert res["efficiency"]["precision"] == "bf16" and "bf16" in res["efficiency"]["limit_source"]
    from matplotlib.text import Text

    from common.reporting import report_plots

    plotted: dict[str, list[str]] = {}  # each PNG's texts (legend, tick labels, titles), read before saving
    save = report_plots._save_png

    def recording_save(fig, target):
        fig.draw_without_rendering()  # tick labels exist once laid out
        plotted[Path(target).name] = [t.get_text() for t in fig.findobj(Text)]
        return save(fig, target)

    monkeypatch.setattr(report_plots, "_save_png", recording_save)
    s07 = importlib.import_module("07_compare_vanilla_vs_optimized")
    assert s07.main(["--results", str(tmp_path / "r.json"), "--out-dir", str(tmp_path / "rep")]) == 0
    assert {"comparison_latency.png", "comparison_stages.png"} <= set(plotted)
    for name, texts in plotted.items():
        assert any("APPROXIMATE (BF16 NETWORK)" in t for t in texts), name
    md = (tmp_path / "rep" / "comparison.md").read_text(encoding="utf-8")
    assert "APPROXIMATE (BF16 NETWORK)" in md and "largest logit error" in md
    assert "source: measured: " in md and res["efficiency"]["limit_kernel"] in md
    report = json.loads((tmp_path / "rep" / "comparison.json").read_text(encoding="utf-8"))
    (summary,) = report["methods"].values()
    assert summary["arithmetic"].startswith("approximate") and summary["limit"]["precision"] == "bf16"


def _row(name: str, seconds: float, agreement: float, approximate: bool) -> SweepRow:
    cfg = RunConfig(name=name, backend="pytorch_channels_last", precision="bf16" if approximate else "float32")
    return SweepRow(config=cfg, factor="precision" if approximate else "baseline", scans=["a"], seconds=[seconds],
                    agreement=[agreement])


def test_05_never_picks_an_approximate_candidate_without_the_option():
    rows = [_row("exact", 10.0, 0.99995, False), _row("bf16 fast", 4.0, 0.99999, True)]
    assert select_fastest(rows).name == "exact"
    assert select_fastest(rows[1:]) is None
    assert select_fastest(rows, allow_approximate=True).name == "bf16 fast"
    # with the option, still only at >= 99.9 % agreement
    low = [_row("exact", 10.0, 0.99995, False), _row("bf16 low", 4.0, 0.995, True)]
    assert select_fastest(low, allow_approximate=True).name == "exact"
    assert not any(c.config.approximate for c in one_factor_configs(cores=2))
    swept = [c.config for c in one_factor_configs(cores=2, allow_approximate=True) if c.config.approximate]
    assert len(swept) == (1 if NATIVE else 0)
