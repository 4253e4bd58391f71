"""Registration keeps its inputs' provenance: the model, weights kind and checkpoint sha256 of both passports in
registration.json and transform.json; mismatches warned once and recorded; stand-in + official refused unless
--allow-mixed-weights; unknown provenance recorded, never blocking (registration/provenance.py gives the rule)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.registration_cases import model_block, passport_files

from common.core.errors import InputError
from common.records.passport import file_sha256
from registration.batch import register_pair, run_batch
from registration.evaluate import main as evaluate_main
from registration.register import main as register_main
from registration.transform import Transform, load_transform

ROOT = Path(__file__).resolve().parents[1]


def register(tmp_path: Path, capsys, fixed_model: dict, moving_model: dict, *extra: str) -> tuple[int, dict, list]:
    """register.py's main in process on two fresh passports: (exit code, registration.json or {}, warning lines)."""
    a, b = passport_files(tmp_path, fixed_model, moving_model)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = register_main(["--fixed-passport", str(a), "--moving-passport", str(b), "--out", str(out), *extra])
    err = capsys.readouterr().err
    report = json.loads((out / "registration.json").read_text(encoding="utf-8")) if rc == 0 else {}
    return rc, report, [ln for ln in err.splitlines() if ln.startswith("warning:")]


def test_same_provenance_is_recorded_in_both_files_without_a_warning(tmp_path, capsys):
    rc, report, warnings = register(tmp_path, capsys, model_block(), model_block())
    assert rc == 0 and warnings == []
    prov = report["provenance"]
    assert prov["mismatches"] == [] and prov["allow_mixed_weights"] is False
    for side, name in (("fixed", "A.json"), ("moving", "B.json")):
        rec = prov[side]
        assert rec["known"] is True and rec["weights"] == "standin" and rec["sha256"] == "a" * 64
        assert rec["name"] == "Dataset297_TotalSegmentator_total_3mm_1559subj" and rec["fold"] == 0
        assert rec["trainer_plans_config"].endswith("__3d_fullres") and rec["standin"]["seed"] == 0
        assert rec["passport"] == str(tmp_path / name)
        assert rec["passport_sha256"] == file_sha256(tmp_path / name)
    stored = load_transform(tmp_path / "out" / "transform.json")
    assert stored.provenance == prov and stored.grid is not None  # the default (deformable) run
    raw = json.loads((tmp_path / "out" / "transform.json").read_text(encoding="utf-8"))
    assert raw["provenance"]["moving"]["sha256"] == "a" * 64


@pytest.mark.parametrize("change,field,needle", [
    ({"sha256": "b" * 64}, "sha256", "bbbbbbbbbbbb"),
    ({"name": "Dataset291_TotalSegmentator_part1_organs_1559subj"}, "model", "Dataset291"),
    ({"name": "Dataset291_TotalSegmentator_part1_organs_1559subj", "sha256": "b" * 64}, "model", "Dataset291"),
    ({"fold": "all"}, "model", "fold all"),
])
def test_a_mismatch_of_the_same_weights_kind_is_one_warning_and_recorded(tmp_path, capsys, change, field, needle):
    rc, report, warnings = register(tmp_path, capsys, model_block(), model_block(**change), "--no-deformable")
    assert rc == 0
    assert len(warnings) == 1 and needle in warnings[0] and "A.json" in warnings[0] and "B.json" in warnings[0]
    (mismatch,) = report["provenance"]["mismatches"]
    assert mismatch["field"] == field and warnings[0] == f"warning: {mismatch['message']}"
    assert report["provenance"]["moving"][next(iter(change))] == change[next(iter(change))]
    assert load_transform(tmp_path / "out" / "transform.json").provenance["mismatches"] == [mismatch]


def test_a_fold_written_as_text_is_the_same_fold(tmp_path, capsys):
    rc, report, warnings = register(tmp_path, capsys, model_block(fold=0), model_block(fold="0"), "--no-deformable")
    assert rc == 0 and warnings == [] and report["provenance"]["mismatches"] == []


def run_register(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "registration/register.py", *args], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=120)


@pytest.mark.parametrize("fixed_kind,moving_kind", [("standin", "official"), ("official", "standin")])
def test_standin_and_official_are_refused_in_one_line_and_nothing_written(tmp_path, fixed_kind, moving_kind):
    a, b = passport_files(tmp_path, model_block(weights=fixed_kind), model_block(weights=moving_kind, sha256="c" * 64))
    out = tmp_path / "out"
    r = run_register("--fixed-passport", str(a), "--moving-passport", str(b), "--out", str(out), "--no-deformable")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert str(a) in lines[0] and str(b) in lines[0] and "--allow-mixed-weights" in lines[0]
    assert "standin" in lines[0] and "official" in lines[0]
    assert not out.exists() or list(out.iterdir()) == []


def test_allow_mixed_weights_runs_warns_once_and_records(tmp_path, capsys):
    rc, report, warnings = register(tmp_path, capsys, model_block(), model_block(weights="official", sha256="c" * 64),
                                    "--no-deformable", "--allow-mixed-weights")
    assert rc == 0 and len(warnings) == 1  # the weights line only: the sha256 difference follows from it
    assert "standin" in warnings[0] and "official" in warnings[0] and "--allow-mixed-weights" in warnings[0]
    prov = report["provenance"]
    assert prov["allow_mixed_weights"] is True and [m["field"] for m in prov["mismatches"]] == ["weights"]
    assert prov["fixed"]["weights"] == "standin" and prov["moving"]["weights"] == "official"
    assert "standin" not in prov["moving"] and prov["moving"]["sha256"] == "c" * 64
    assert load_transform(tmp_path / "out" / "transform.json").provenance == prov


def test_register_help_names_the_flag():
    r = run_register("--help")
    assert r.returncode == 0 and "--allow-mixed-weights" in r.stdout


def test_both_unknown_is_recorded_without_a_warning(tmp_path, capsys):
    rc, report, warnings = register(tmp_path, capsys, {}, {}, "--no-deformable")
    assert rc == 0 and warnings == []
    prov = report["provenance"]
    assert prov["fixed"]["known"] is False and prov["moving"]["known"] is False and prov["mismatches"] == []
    assert prov["fixed"]["weights"] is None and prov["moving"]["passport_sha256"] == file_sha256(tmp_path / "B.json")


@pytest.mark.parametrize("known_side", ["fixed", "moving"])
@pytest.mark.parametrize("kind", ["standin", "official"])
def test_one_unknown_side_warns_once_and_does_not_block(tmp_path, capsys, known_side, kind):
    known = model_block(weights=kind)
    models = (known, {}) if known_side == "fixed" else ({}, known)
    rc, report, warnings = register(tmp_path, capsys, *models, "--no-deformable")
    assert rc == 0 and len(warnings) == 1 and "unknown" in warnings[0] and kind in warnings[0]
    unknown_name = "B.json" if known_side == "fixed" else "A.json"
    assert unknown_name in warnings[0]
    prov = report["provenance"]
    assert [m["field"] for m in prov["mismatches"]] == ["provenance"]
    assert prov[known_side]["known"] is True and prov["moving" if known_side == "fixed" else "fixed"]["known"] is False


def test_old_transform_files_without_provenance_still_load(tmp_path):
    T = Transform(np.eye(3), np.array([1.0, 2.0, 3.0]), meta={"note": "old"})
    doc = T.to_dict()
    del doc["provenance"]  # a file written before the block existed
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    old = load_transform(path)
    assert old.provenance is None and old.meta == {"note": "old"} and np.allclose(old.translation, [1, 2, 3])
    T.provenance = {"fixed": {"known": False}, "moving": {"known": False}, "mismatches": []}
    assert load_transform(T.save(tmp_path / "new.json")).provenance == T.provenance
    assert T.rigid_only().provenance == T.provenance
    doc["provenance"] = "standin"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(InputError, match="provenance"):
        load_transform(path)


def batch_folder(tmp_path: Path, fixed_model: dict, moving_model: dict) -> Path:
    """A batch folder with one pair p1 (fixed = insp, moving = exp) given by passports (the scans are names only:
    with a passport beside it a scan is not read)."""
    folder = tmp_path / "batch"
    folder.mkdir()
    passport_files(folder, fixed_model, moving_model, names=("p1_insp.passport.json", "p1_exp.passport.json"))
    for scan in ("p1_insp.nii.gz", "p1_exp.nii.gz"):
        (folder / scan).write_bytes(b"")
    return folder


def test_batch_applies_the_same_rule(tmp_path):
    folder = batch_folder(tmp_path, model_block(), model_block(weights="official", sha256="c" * 64))
    with pytest.raises(InputError, match="allow-mixed-weights"):
        register_pair("p1", folder / "p1_exp.nii.gz", folder / "p1_insp.nii.gz")
    (pair,) = run_batch(folder)["pairs"]
    assert "p1_exp.passport.json" in pair["error"] and "p1_insp.passport.json" in pair["error"]
    (pair,) = run_batch(folder, allow_mixed_weights=True)["pairs"]
    assert "error" not in pair and pair["provenance"]["allow_mixed_weights"] is True
    assert [m["field"] for m in pair["provenance"]["mismatches"]] == ["weights"]
    assert pair["provenance"]["fixed"]["passport"] == str(folder / "p1_insp.passport.json")


def test_evaluate_batch_refuses_then_allows_and_warns(tmp_path, capsys):
    folder = batch_folder(tmp_path, model_block(), model_block(weights="official", sha256="c" * 64))
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert evaluate_main(["--batch-only", "--batch", str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "allow-mixed-weights" in err and "Traceback" not in err
    assert evaluate_main(["--batch-only", "--batch", str(folder), "--out", str(out), "--allow-mixed-weights"]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: p1: weights differ")
    (pair,) = json.loads(out.read_text(encoding="utf-8"))["batch"]["pairs"]
    assert pair["provenance"]["allow_mixed_weights"] is True
