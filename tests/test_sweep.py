"""05's configuration sweep and selection rule, on hand-made rows with known answers."""
from __future__ import annotations

from common.inference.run_config import RunConfig, load_config, save_config
from common.runs.sweep import FACTORS, SweepRow, combine, one_factor_configs, select_fastest


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
        changed = {k for k in ("backend", "onnx_norm", "torch_threads", "keep_freed_memory") if got[k] != base[k]}
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


def test_combine_keeps_the_channels_last_backend_and_the_heap_setting(tmp_path):
    cfgs = {c.config.name: c.config for c in one_factor_configs(cores=2)}
    best = {"backend": cfgs["pytorch channels-last threads=2"], "keep_freed_memory": cfgs["keep freed memory (glibc heap)"],
            "graph_optimization": cfgs["ort graph_optimization=basic"]}
    combo = combine(best)
    assert combo.backend == "pytorch_channels_last" and combo.torch_threads == 2 and combo.keep_freed_memory
    assert combo.ort.graph_optimization == cfgs["baseline: ort defaults"].ort.graph_optimization  # ORT only
    assert load_config(save_config(combo, tmp_path / "c.json")).to_dict() == combo.to_dict()


def test_the_sweep_takes_a_multi_tile_scan_when_the_first_scans_fit_in_one_tile(tmp_path, model_spec, example_ct_sm,
                                                                                 example_ct):
    import nibabel as nib
    import numpy as np

    from common.inference.tile_count import tiles_for_image
    from common.runs.sweep_run import pick_sweep_scans

    sm = nib.load(example_ct_sm)
    scans = {}
    for name, extra in (("two_rows", 120), ("three_rows", 200)):  # mirrored along z: more rows of tiles
        data = np.pad(np.asanyarray(sm.dataobj), ((0, 0), (0, 0), (0, extra)), mode="symmetric")
        scans[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, sm.affine, sm.header), scans[name])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a scan")
    tiles = {name: tiles_for_image(nib.load(path), model_spec) for name, path in scans.items()}
    assert tiles_for_image(sm, model_spec) == 1 and 1 < tiles["two_rows"] < tiles["three_rows"]

    order = [example_ct_sm, broken, scans["three_rows"], example_ct, scans["two_rows"]]
    # the first 2 valid scans are example_ct_sm and three_rows: one is multi-tile already, kept as is, tiles last
    assert pick_sweep_scans(order, 2, model_spec) == [example_ct_sm, scans["three_rows"]]
    # the first 2 valid scans both fit in one tile: the multi-tile scan with the fewest tiles replaces the last
    order = [example_ct_sm, broken, example_ct, scans["three_rows"], scans["two_rows"]]
    assert pick_sweep_scans(order, 2, model_spec) == [example_ct_sm, scans["two_rows"]]
    assert pick_sweep_scans([example_ct_sm, example_ct], 3, model_spec) == [example_ct_sm, example_ct]
    assert pick_sweep_scans([broken], 3, model_spec) == []
