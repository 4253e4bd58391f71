"""The ts-bench-result schema: building, round trips and rejection of bad files."""
from __future__ import annotations

import json

import pytest

from common.core.errors import InputError
from common.records.results import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    STAGES,
    add_repeat,
    finalize_scan,
    mark_failed,
    new_result,
    new_scan_record,
    read_result,
    summarize,
    validate_result,
    write_result,
)

MODEL = {"name": "Task297_fast_standin", "weights": "standin", "sha256": "ab" * 32}


def make_result() -> dict:
    res = new_result("05_tuned_pipeline.py", method="optimized", settings={"threads": 4}, model=MODEL)
    rec = new_scan_record("ct_data/scan_a.nii.gz", shape=(100, 100, 50), spacing_mm=(1.5, 1.5, 3.0),
                          orientation="RAS")
    for total in (3.0, 2.0, 2.5, 4.0):
        add_repeat(rec, total, {"load": 0.1, "inference": total - 0.5, "save": 0.2})
    finalize_scan(rec)
    rec["labels_present"] = [1, 2, 5]
    rec["mask"] = "benchmarks/masks/scan_a.nii.gz"
    res["scans"].append(rec)
    bad = new_scan_record("ct_data/scan_b.nii", shape=(10, 10, 10), spacing_mm=(1, 1, 1), orientation="LPS")
    mark_failed(bad, RuntimeError("out of\nmemory"))
    finalize_scan(bad)
    res["scans"].append(bad)
    summarize(res)
    return res


def test_build_and_summary():
    res = make_result()
    assert res["schema"] == SCHEMA_NAME and res["schema_version"] == SCHEMA_VERSION
    assert res["created"].endswith("Z")
    assert {"cpu_model", "logical_cores", "usable_cores", "ram_gib", "os", "python"} <= set(res["machine"])
    assert "hostname" not in res["machine"]
    assert {"python", "torch", "onnxruntime", "totalsegmentator", "nnunetv2", "numpy", "onnx"} <= set(res["versions"])
    a, b = res["scans"]
    assert a["scan_id"] == "scan_a" and b["scan_id"] == "scan_b"
    med = a["median"]
    assert med["total_s"] == 2.75 and med["min_total_s"] == 2.0 and med["max_total_s"] == 4.0 and med["n"] == 4
    assert med["iqr_total_s"] == pytest.approx(3.25 - 2.375)
    assert med["stages"] == {"load": 0.1, "inference": 2.25, "save": 0.2}
    assert b["status"] == "failed" and b["error"] == "RuntimeError: out of memory" and b["median"] is None
    s = res["summary"]
    assert (s["n_scans"], s["n_ok"], s["n_failed"], s["success_rate"]) == (2, 1, 1, 0.5)
    assert s["latency_median_s"] == 2.75 and s["latency_p95_s"] == 2.75
    assert s["throughput_mvox_s"] == pytest.approx(100 * 100 * 50 / 2.75 / 1e6)


def test_round_trip(tmp_path):
    res = make_result()
    res["extra_key"] = {"tolerated": True}
    res["scans"][0]["something_new"] = 1
    path = write_result(res, tmp_path / "sub" / "05_optimized.json")
    assert read_result(path) == json.loads(json.dumps(res))
    assert [p.name for p in path.parent.iterdir()] == ["05_optimized.json"]  # no temp file left


def test_repeat_and_model_checks():
    rec = new_scan_record("x.nii.gz", shape=(1, 1, 1), spacing_mm=(1, 1, 1), orientation="RAS")
    with pytest.raises(ValueError, match="unknown stage"):
        add_repeat(rec, 1.0, {"warmup": 0.1})
    with pytest.raises(ValueError):
        add_repeat(rec, float("nan"), {})
    add_repeat(rec, 1.0, dict.fromkeys(STAGES, 0.1))
    with pytest.raises(ValueError):
        new_result("x", method="m", settings={}, model={"name": "n", "weights": "pretty", "sha256": None})
    with pytest.raises(ValueError):
        new_result("x", method="m", settings={}, model={"name": "n", "weights": "official"})


def _write(tmp_path, obj, name="r.json") -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return str(path)


def _assert_rejected(path: str, *fragments: str) -> None:
    with pytest.raises(InputError) as info:
        read_result(path)
    msg = str(info.value)
    assert msg.startswith(path + ": ") and "\n" not in msg
    for f in fragments:
        assert f in msg


def test_reject_missing_and_malformed(tmp_path):
    _assert_rejected(str(tmp_path / "absent.json"), "not found")
    _assert_rejected(_write(tmp_path, '{"schema": "ts-bench-result", '), "not valid JSON")
    _assert_rejected(_write(tmp_path, "[1, 2]"), "not a ts-bench result")


def test_reject_wrong_schema_name(tmp_path):
    res = make_result()
    res["schema"] = "something-else"
    _assert_rejected(_write(tmp_path, res), "not a ts-bench result", "something-else")


def test_reject_unknown_schema_version(tmp_path):
    res = make_result()
    res["schema_version"] = 7
    path = _write(tmp_path, res)
    with pytest.raises(InputError) as info:
        read_result(path)
    assert str(info.value) == f"{path}: result schema version 7, this program reads version 1"


@pytest.mark.parametrize("mutate, fragment", [
    (lambda r: r.pop("scans"), "'scans'"),
    (lambda r: r["model"].pop("sha256"), "'model.sha256'"),
    (lambda r: r["scans"][0].pop("shape"), "'scans[0].shape'"),
    (lambda r: r["scans"][0]["median"].pop("total_s"), "'scans[0].median.total_s'"),
    (lambda r: r["scans"][0].update(status="maybe"), "'scans[0].status'"),
    (lambda r: r["scans"][0]["repeats"][0]["stages"].update(warmup=1.0), "warmup"),
    (lambda r: r["scans"][0].update(shape=[1, "2", 3]), "'scans[0].shape'"),
    (lambda r: r["model"].update(weights="mine"), "'model.weights'"),
    (lambda r: r.update(method=3), "'method'"),
    (lambda r: r["scans"][0]["median"].update(total_s=r["scans"][0]["median"]["max_total_s"] + 1), "inconsistent"),
    (lambda r: r.update(complete="yes"), "'complete'"),
    (lambda r: r.update(ignored=[{"file": 1}]), "'ignored[0]'"),
])
def test_reject_missing_or_mistyped_field(tmp_path, mutate, fragment):
    res = make_result()
    mutate(res)
    _assert_rejected(_write(tmp_path, res), fragment)


def test_write_refuses_invalid(tmp_path):
    res = make_result()
    del res["machine"]
    with pytest.raises(InputError, match="machine"):
        write_result(res, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    assert validate_result(make_result()) is not None
