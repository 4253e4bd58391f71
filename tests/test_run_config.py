"""A run configuration file with an unknown key, an unknown backend, a list instead of an object or an invalid
value: 06 refuses it in one line (exit 2) before any work; 05's own files still load."""
from __future__ import annotations

import importlib
import json

import pytest

from common.inference.run_config import RunConfig, load_config, save_config

BASE = RunConfig.fastest_exact().to_dict()
BAD = {
    "list": ([1, 2], "JSON object"),
    "typo": ({**BASE, "backnd": "pytorch"}, "unknown key(s) backnd"),
    "backend": ({**BASE, "backend": "tensorrt"}, "'backend' must be one of"),
    "ort key": ({**BASE, "ort": {"threads": 2}}, "ort.threads"),
    "segment list": ({**BASE, "segment": []}, "'segment' must be an object"),
    "tile step": ({**BASE, "segment": {"tile_step": 0}}, "segment.tile_step"),
    "order": ({**BASE, "segment": {"resample_order": 7}}, "segment.resample_order"),
    "threads": ({**BASE, "torch_threads": -1}, "torch_threads"),
    "not json": ("{oops", "unreadable run configuration"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_06_refuses_a_bad_run_configuration_in_one_line(case, tmp_path, capsys, example_ct_sm):
    content, words = BAD[case]
    cfg = tmp_path / "config.json"
    cfg.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    code = importlib.import_module("06_inferenceAndPassport").main([
        "--input", str(example_ct_sm), "--out", str(tmp_path / "out"), "--result", str(tmp_path / "r.json"),
        "--config", str(cfg)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and str(cfg) in err[0] and words in err[0], err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_05s_configuration_with_its_extra_keys_loads(tmp_path):
    path = save_config(RunConfig.fastest_exact(), tmp_path / "c.json",
                       extra={"chosen_by": "05", "threshold": 0.999, "reference": "x", "sweep_seconds": 1.0,
                              "sweep_agreement": [1.0]})
    assert load_config(path).to_dict() == {**RunConfig.fastest_exact().to_dict()}


def test_the_file_is_read_by_the_same_typed_fields_python_builds_the_configuration_with():
    from common.inference.run_config import KNOWN_KEYS, OrtSettings, RunConfigFile, SegmentOptions

    assert issubclass(RunConfigFile, RunConfig) and set(RunConfig().to_dict()) <= set(KNOWN_KEYS)
    cfg = RunConfig(name="x", backend="pytorch", ort=OrtSettings(intra_op_threads=3),
                    segment=SegmentOptions(tile_step=0.5, accumulate="float32"), torch_threads=2)
    assert RunConfigFile.model_validate(cfg.to_dict()).config() == cfg
    with pytest.raises(ValueError, match="must be one of"):
        SegmentOptions(accumulate="bfloat16")  # the same check in Python as in a file
