"""The numbered scripts end to end on small real CT (stand-in weights): 03 -> 05 -> 06 -> 07, plus 04.

Inputs are made here from ../shared: a crop of example_ct, a garbage file and a truncated .nii.gz in the
same folder. Bad files are reported in the result JSON, the others still finish. To keep the suite's time
flat, every script here runs on the small-tile stand-in (32^3-voxel tiles, the same network and code paths;
conftest.tiny_standin_home), so 05's whole sweep costs seconds, not minutes.
"""
from __future__ import annotations

import gzip
import importlib
import json

import nibabel as nib
import numpy as np
import pytest

from common.core.atomic import leftover_temp_files
from common.records.passport import load_passport
from common.records.results import read_result

pytestmark = pytest.mark.slow


def _script(name: str):
    return importlib.import_module(name)


@pytest.fixture(scope="module", autouse=True)
def _small_tiles(tiny_standin_home, project_home):
    with project_home(tiny_standin_home):
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, example_ct, tiny_onnx_model):
    d = tmp_path_factory.mktemp("scripts")
    scans = d / "scans"
    scans.mkdir()
    img = nib.load(example_ct)
    nib.save(img.slicer[40:80, 30:70, 40:64], scans / "crop_ct.nii.gz")
    (scans / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file")
    raw = gzip.compress(nib.load(example_ct).to_bytes())
    (scans / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    return {"dir": d, "scans": scans, "onnx": tiny_onnx_model}


@pytest.fixture(scope="module")
def ran_03(workdir):
    out = workdir["dir"]
    code = _script("03_vanilla_benchmark").main(["--input", str(workdir["scans"]), "--out", str(out / "m03"),
                                                 "--result", str(out / "03.json"), "--repeats", "1",
                                                 "--warmup", "0", "--weights", "standin"])
    return code, read_result(out / "03.json")


def _by_id(result: dict) -> dict:
    return {s["scan_id"]: s for s in result["scans"]}


def test_03_records_bad_files_and_finishes_the_rest(ran_03):
    code, res = ran_03
    assert code == 1  # some scans failed
    scans = _by_id(res)
    assert scans["crop_ct"]["status"] == "ok" and scans["crop_ct"]["median"]["total_s"] > 0
    assert scans["garbage"]["status"] == "failed" and "garbage.nii.gz" in scans["garbage"]["error"]
    assert scans["truncated"]["status"] == "failed" and "truncated or corrupt" in scans["truncated"]["error"]
    assert res["model"]["weights"] == "standin" and len(res["model"]["sha256"]) == 64
    assert res["method"] == "official_pytorch"


def test_04_onnx_defaults(workdir, ran_03):
    out = workdir["dir"]
    code = _script("04_onnx_benchmark").main(["--input", str(workdir["scans"] / "crop_ct.nii.gz"),
                                              "--out", str(out / "m04"), "--result", str(out / "04.json"),
                                              "--onnx", str(workdir["onnx"]), "--repeats", "2", "--warmup", "1",
                                              "--weights", "standin"])
    assert code == 0
    rec = read_result(out / "04.json")["scans"][0]
    assert len(rec["repeats"]) == 2
    assert set(rec["median"]["stages"]) == {"load", "preprocess", "inference", "postprocess", "save"}
    ref = np.asanyarray(nib.load(_by_id(ran_03[1])["crop_ct"]["mask"]).dataobj)
    ours = np.asanyarray(nib.load(rec["mask"]).dataobj)
    assert ours.shape == ref.shape and np.mean(ours == ref) > 0.99


@pytest.fixture(scope="module")
def ran_05(workdir, ran_03):
    out = workdir["dir"]
    code = _script("05_optimized_python_benchmark").main([
        "--input", str(workdir["scans"]), "--out", str(out / "m05"), "--result", str(out / "05.json"),
        "--reference", str(out / "03.json"), "--config-out", str(out / "optimized_config.json"),
        "--onnx", str(workdir["onnx"]), "--repeats", "1", "--warmup", "0", "--sweep-scans", "1",
        "--finalist-runs", "1", "--weights", "standin", "--efficiency"])
    return code, read_result(out / "05.json")


def test_05_sweeps_and_picks_a_faithful_configuration(ran_05, workdir):
    code, res = ran_05
    assert code == 1  # the two bad files fail in the final benchmark, the crop succeeds
    names = {row["name"] for row in res["sweep"]}
    assert {"baseline: ort defaults", "tile_step=0.5", "tile_step=1.0", "resample_order=3",
            "combined best factors"} <= names
    assert any(n.startswith("pytorch threads") for n in names)
    assert any(n.startswith("onnx_norm=native") for n in names)
    chosen = next(r for r in res["finalists"] if r["name"] == res["chosen"])
    assert min(chosen["agreement"]) >= 0.999
    assert res["finalists"][-1]["name"] == "baseline: ort defaults" or any(
        r["name"] == "baseline: ort defaults" for r in res["finalists"])
    fastest_ok = min((r for r in res["finalists"] if min(r["agreement"]) >= 0.999 and not r["error"]),
                     key=lambda r: sum(r["seconds"]))
    assert fastest_ok["name"] == chosen["name"]
    cfg = json.loads((workdir["dir"] / "optimized_config.json").read_text(encoding="utf-8"))
    assert cfg["schema"] == "ts-bench-run-config" and cfg["sweep_agreement"] == chosen["agreement"]
    assert _by_id(res)["crop_ct"]["status"] == "ok"
    crop = _by_id(res)["crop_ct"]
    # --efficiency: the chosen configuration's limit and efficiency (tile FLOPs from the ONNX graph, any backend)
    assert res["efficiency"]["limit_s_per_tile"] > 0
    assert crop["efficiency"] == pytest.approx(res["efficiency"]["limit_s_per_tile"] / crop["inference_s_per_tile"])


@pytest.fixture(scope="module")
def ran_06(workdir, ran_05):
    out = workdir["dir"]
    argv = ["--input", str(workdir["scans"]), "--out", str(out / "m06"), "--result", str(out / "06.json"),
            "--config", str(out / "optimized_config.json"), "--onnx", str(workdir["onnx"]), "--weights", "standin"]
    code = _script("06_inferenceAndPassport").main(argv)
    return code, read_result(out / "06.json"), argv


def test_06_writes_masks_and_passports_and_reports_bad_files(ran_06, workdir):
    code, res, _ = ran_06
    assert code == 1
    scans = _by_id(res)
    ok = scans["crop_ct"]
    assert ok["status"] == "ok"
    mask = nib.load(ok["mask"])
    src = nib.load(workdir["scans"] / "crop_ct.nii.gz")
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    passport = load_passport(ok["passport"])
    assert passport.model["weights"] == "standin"
    assert {s.label for s in passport.structures} == set(ok["labels_present"])
    assert ok["median"]["stages"]["passport"] > 0
    assert scans["garbage"]["status"] == "failed" and scans["truncated"]["status"] == "failed"
    assert not leftover_temp_files(workdir["dir"] / "m06")


def test_06_resumes_and_force_recomputes(ran_06, workdir):
    _, first, argv = ran_06
    out = workdir["dir"]
    code = _script("06_inferenceAndPassport").main(argv + ["--result", str(out / "06b.json")])
    res = read_result(out / "06b.json")
    assert code == 1  # the bad files still fail
    assert [s["file"] for s in res["skipped"]] == [str(workdir["scans"] / "crop_ct.nii.gz")]
    code = _script("06_inferenceAndPassport").main(argv + ["--result", str(out / "06c.json"), "--force"])
    assert _by_id(read_result(out / "06c.json"))["crop_ct"]["status"] == "ok"


def test_07_compares_all_results(ran_03, ran_05, ran_06, workdir):
    out = workdir["dir"]
    code = _script("07_compare_vanilla_vs_optimized").main([
        "--results", str(out / "03.json"), str(out / "05.json"), str(out / "06.json"),
        "--out-dir", str(out / "report")])
    assert code == 0
    md = (out / "report" / "comparison.md").read_text(encoding="utf-8").splitlines()
    assert "Stand-in weights" in md[0]
    comp = json.loads((out / "report" / "comparison.json").read_text(encoding="utf-8"))
    assert comp["schema"] == "ts-bench-comparison"
    text = "\n".join(md)
    assert "crop_ct" in text and "optimized" in text
