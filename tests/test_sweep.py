"""05's configuration sweep and selection rule, on hand-made rows with known answers."""
from __future__ import annotations

from common.runner import RunConfig, load_config, save_config
from common.sweep import FACTORS, SweepRow, combine, one_factor_configs, select_fastest


def test_one_factor_configs_cover_the_issue_factors():
    candidates = one_factor_configs(cores=2)
    cfgs = [c.config for c in candidates]
    names = [c.name for c in cfgs]
    assert names[0].startswith("baseline")
    for expected in ("ort intra_op_threads=1", "ort intra_op_threads=2", "pytorch threads=2",
                     "ort graph_optimization=basic", "ort execution_mode=parallel", "resample_order=3",
                     "tile_step=0.5", "tile_step=1.0", "accumulate=float32"):
        assert expected in names
    base = cfgs[0]
    assert (base.segment.resample_order, base.segment.tile_step) == (1, 0.8)  # the official defaults
    step = next(c for c in cfgs if c.name == "tile_step=1.0")
    assert step.segment.tile_step == 1.0 and step.backend == base.backend  # only one factor changed
    assert {c.factor for c in candidates} >= {"backend", "tile_step", "resample_order", "accumulate"}


def test_each_candidate_changes_only_its_factor():
    candidates = one_factor_configs(cores=2)
    assert candidates[0].factor == "baseline" and {c.factor for c in candidates[1:]} <= set(FACTORS)
    base = candidates[0].config.to_dict()
    for cand in candidates[1:]:
        got = cand.config.to_dict()
        changed = {k for k in ("backend", "onnx_norm", "torch_threads") if got[k] != base[k]}
        changed |= {k for section in ("ort", "segment") for k in got[section] if got[section][k] != base[section][k]}
        owner = {"intra_op_threads": "backend", "torch_threads": "backend"}
        assert {owner.get(k, k) for k in changed} == {cand.factor}, cand


def _row(name: str, seconds: list[float], agreement: list[float], error: str | None = None) -> SweepRow:
    return SweepRow(config=RunConfig(name=name), factor="baseline", scans=["a", "b"], seconds=seconds,
                    agreement=agreement, error=error)


def test_select_fastest_requires_agreement_on_every_scan():
    rows = [
        _row("slow ok", [5.0, 5.0], [1.0, 1.0]),
        _row("fast but one scan off", [1.0, 1.0], [1.0, 0.998]),
        _row("medium ok", [3.0, 3.0], [0.9995, 0.9991]),
        _row("broken", [], [], error="boom"),
    ]
    assert select_fastest(rows).name == "medium ok"
    assert select_fastest(rows, threshold=0.99999).name == "slow ok"
    assert select_fastest(rows[1:2]) is None


def test_a_row_is_written_as_before():
    row = _row("medium ok", [3.0, 3.0], [0.9995, 0.9991])
    assert list(row.to_json()) == ["name", "config", "scans", "seconds", "stages", "agreement", "runs", "error",
                                   "factor"]
    assert row.to_json()["config"] == RunConfig(name="medium ok").to_dict() and row.to_json()["name"] == "medium ok"


def test_combine_takes_each_winning_factor_and_round_trips(tmp_path):
    cfgs = {c.config.name: c.config for c in one_factor_configs(cores=2)}
    best = {"backend": cfgs["ort intra_op_threads=2"], "accumulate": cfgs["accumulate=float32"],
            "graph_optimization": cfgs["ort graph_optimization=basic"]}
    combo = combine(best)
    assert combo.backend == "onnxruntime" and combo.ort.intra_op_threads == 2
    assert combo.segment.accumulate == "float32" and combo.ort.graph_optimization == "basic"
    path = save_config(combo, tmp_path / "c.json")
    back = load_config(path)
    assert back.to_dict() == combo.to_dict()
    assert isinstance(back, RunConfig)
