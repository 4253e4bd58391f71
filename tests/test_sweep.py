"""05's configuration sweep and selection rule, on hand-made rows with known answers."""
from __future__ import annotations

from common.runner import RunConfig, load_config, save_config
from common.sweep import combine, factor_of, one_factor_configs, select_fastest


def test_one_factor_configs_cover_the_issue_factors():
    cfgs = one_factor_configs(cores=2)
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
    assert {factor_of(c) for c in cfgs} >= {"backend", "tile_step", "resample_order", "accumulate"}


def test_select_fastest_requires_agreement_on_every_scan():
    rows = [
        {"name": "slow ok", "seconds": [5.0, 5.0], "agreement": [1.0, 1.0]},
        {"name": "fast but one scan off", "seconds": [1.0, 1.0], "agreement": [1.0, 0.998]},
        {"name": "medium ok", "seconds": [3.0, 3.0], "agreement": [0.9995, 0.9991]},
        {"name": "broken", "seconds": [], "agreement": [], "error": "boom"},
    ]
    assert select_fastest(rows)["name"] == "medium ok"
    assert select_fastest(rows, threshold=0.99999)["name"] == "slow ok"
    assert select_fastest(rows[1:2]) is None


def test_combine_takes_each_winning_factor_and_round_trips(tmp_path):
    cfgs = {c.name: c for c in one_factor_configs(cores=2)}
    best = {"backend": cfgs["ort intra_op_threads=2"], "accumulate": cfgs["accumulate=float32"],
            "graph_optimization": cfgs["ort graph_optimization=basic"]}
    combo = combine(best)
    assert combo.backend == "onnxruntime" and combo.ort.intra_op_threads == 2
    assert combo.segment.accumulate == "float32" and combo.ort.graph_optimization == "basic"
    path = save_config(combo, tmp_path / "c.json")
    back = load_config(path)
    assert back.to_dict() == combo.to_dict()
    assert isinstance(back, RunConfig)
