"""Issue 27's cohort benchmark on a tiny cohort (crops of the shared CT, one as a DICOM series, tiny stand-in
network): each method runs in a fresh process, the JSON holds wall time, scans per hour and per core-hour and the
process tree's peak RSS, and 07 renders it as the cohort table."""
from __future__ import annotations

import importlib
import json

import pytest

from common.runs.cohort import build_cohort, method_command


def test_the_cohort_has_mixed_sizes_and_a_dicom_series(tmp_path, example_ct):
    scans = build_cohort(example_ct.parent, tmp_path / "c", small=True)
    assert len(scans) == 4 and sum(s.path.is_dir() for s in scans) == 1  # the DICOM series
    assert len(list((tmp_path / "c" / "example_ct_sm_dicom").glob("*.dcm"))) == 30
    assert all(s.tiles >= 1 for s in scans)
    with pytest.raises(ValueError, match="unknown method"):
        method_command("nnunet", tmp_path, tmp_path, "standin", 2)


@pytest.mark.slow
def test_cohort_benchmark_runs_and_07_renders_it(tmp_path, example_ct, in_tiny_home, capsys):
    script = importlib.import_module("cohort_benchmark")
    work, result = tmp_path / "work", tmp_path / "cohort.json"
    code = script.main(["--shared-ct", str(example_ct.parent), "--work", str(work), "--result", str(result),
                        "--small", "--methods", "06,totalseg-fast"])
    assert code == 0, (work / "06" / "log.txt").read_text(errors="replace")[-2000:]
    doc = json.loads(result.read_text(encoding="utf-8"))
    assert [m["method"] for m in doc["methods"]] == ["06", "totalseg-fast"] and len(doc["cohort"]) == 4
    for m in doc["methods"]:
        assert m["exit_code"] == 0 and m["scans_ok"] == 4 and m["wall_s"] > 0 and m["peak_rss_bytes"] > 0
        assert m["scans_per_hour"] == pytest.approx(4 / m["wall_s"] * 3600)
        assert m["scans_per_core_hour"] == pytest.approx(m["scans_per_hour"] / m["cores"])
    s07 = importlib.import_module("07_compare_vanilla_vs_optimized")
    assert s07.main(["--results", str(work / "06" / "result.json"), "--out-dir", str(tmp_path / "r"),
                     "--cohort", str(result)]) == 0, capsys.readouterr().err
    md = (tmp_path / "r" / "comparison.md").read_text(encoding="utf-8")
    assert "## Cohort" in md and "| totalseg-fast |" in md
    report = json.loads((tmp_path / "r" / "comparison.json").read_text(encoding="utf-8"))
    assert report["cohort"]["methods"][0]["method"] == "06"
