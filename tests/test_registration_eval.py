"""Registration on the real CT (example_ct_sm + its official label map) against KNOWN transforms.

The moving scans are made by the evaluation harness (registration/synthetic.py, registration/harness.py): the real CT and labels
pulled through a seeded rigid transform (<= 15 deg, <= 30 mm) plus a smooth deformation of a given
peak size. Passports come from the label maps only; errors are measured against the known truth in mm.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.registration_cases import real_ct_case

from common.imaging.geometry import voxel_to_world
from common.records.passport import build_passport, compute_structures, save_passport
from registration.batch import find_pairs, run_batch
from registration.harness import evaluate_case, load_ct_and_labels
from registration.synthetic import KnownTransform, make_moving, random_known_transform
from registration.transform import load_transform, warp_labels
from registration.two_tier import register_passports

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ct_case(example_ct_sm, example_seg):
    return real_ct_case(example_ct_sm, example_seg)


def run_case(ct: dict, known: KnownTransform, n_points: int = 4000, with_dice: bool = False) -> dict:
    return evaluate_case(ct["img"], ct["anatomy"], ct["aff"], ct["names"], known, fixed_labels=ct["lab"],
                         fixed_passport=ct["fp"], n_points=n_points, with_dice=with_dice)


def test_self_registration_is_exact(ct_case):
    res = run_case(ct_case, KnownTransform.identity(), with_dice=True)
    for key in ("body", "inside", "boundary", "centroids"):
        assert res["tre_mm"][key]["rigid"]["max"] < 0.01
        assert res["tre_mm"][key]["rigid_tps"]["max"] < 0.01
    assert res["dice"]["rigid_tps"]["mean"] == pytest.approx(1.0)
    assert res["n_structures"]["rigid_outliers"] == []


def test_rigid_truth_recovered(ct_case):
    known = random_known_transform(np.random.default_rng([0, 0, 0]), ct_case["center"], ct_case["body"],
                                   max_angle_deg=15.0, max_shift_mm=30.0, peak_mm=0.0)
    res = run_case(ct_case, known)
    assert res["tre_mm"]["body"]["none"]["mean"] > 10.0  # the truth really moves the scan
    assert res["tre_mm"]["body"]["rigid"]["mean"] < 1.0
    assert res["tre_mm"]["centroids"]["rigid"]["mean"] < 1.0


@pytest.mark.parametrize("group,peak", [(1, 5.0), (2, 10.0), (3, 20.0)])
def test_tps_halves_dense_error_of_known_deformation(ct_case, group, peak):
    """Rigid (<= 15 deg, <= 30 mm) + smooth deformation of peak ``peak`` mm (seeds as the harness uses)."""
    known = random_known_transform(np.random.default_rng([0, group, 0]), ct_case["center"], ct_case["body"],
                                   max_angle_deg=15.0, max_shift_mm=30.0, peak_mm=peak)
    assert known.max_gradient(ct_case["body"]) < 1.0  # the truth itself does not fold
    res = run_case(ct_case, known)
    body = res["tre_mm"]["body"]
    assert body["rigid_tps"]["mean"] <= 0.5 * body["rigid"]["mean"], body
    assert res["jacobian"]["fraction_nonpositive"] < 0.001
    assert res["jacobian"]["fraction_nonpositive_body_points"] < 0.001
    for key in ("inside", "boundary"):
        assert res["tre_mm"][key]["rigid_tps"]["mean"] < res["tre_mm"][key]["rigid"]["mean"]


def test_identity_warp_of_real_labels_is_exact(ct_case):
    from registration.transform import Transform
    lab, aff = ct_case["anatomy"], ct_case["aff"]
    assert np.array_equal(warp_labels(lab, aff, lab.shape, aff, Transform.identity()), lab)


def test_register_cli_end_to_end(ct_case, example_ct_sm, tmp_path):
    known = random_known_transform(np.random.default_rng(7), ct_case["center"], ct_case["body"], peak_mm=10.0)
    m_img, m_lab, m_aff = make_moving(ct_case["img"], ct_case["anatomy"], ct_case["aff"], known)
    names = ct_case["names"]
    a = save_passport(build_passport(ct_case["lab"], ct_case["aff"], names, scan={}, model={},
                                     resolution="original"), tmp_path / "A.json")
    b = save_passport(build_passport(m_lab, m_aff, names, scan={}, model={}, resolution="original"),
                      tmp_path / "B.json")
    moving_scan = tmp_path / "B.nii.gz"
    nib.save(nib.Nifti1Image(m_img, m_aff), str(moving_scan))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "registration/register.py", "--fixed-passport", str(a),
                        "--moving-passport", str(b), "--fixed-scan", str(example_ct_sm), "--moving-scan",
                        str(moving_scan), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("transform.json", "registration.json", "overlay.png"):
        assert (out / name).is_file()
    rep = json.loads((out / "registration.json").read_text(encoding="utf-8"))
    assert rep["time_ms"]["rigid"] > 0 and rep["time_ms"]["deformable"] > 0
    assert rep["n_control_points"] > 0 and "liver" in rep["rigid"]["residuals_mm"]
    # the deformable tier's check is recorded: kept here (10 mm deformation), with the smoothing it chose
    tps = rep["tps"]
    assert tps["accepted"] is True and tps["validation"]["accepted"] is True
    assert tps["smoothing_used"] in tps["validation"]["candidates"]
    assert tps["validation"]["cv_over_rigid"] < 1.0 - rep["settings"]["deformable_options"]["accept_margin"]
    T = load_transform(out / "transform.json")
    x = ct_case["body"][::500]
    err = np.linalg.norm(T.fixed_to_moving(x) - known.fixed_to_moving(x), axis=1).mean()
    assert err < 2.0
    # rigid only
    r = subprocess.run([sys.executable, "registration/register.py", "--fixed-passport", str(a),
                        "--moving-passport", str(b), "--out", str(tmp_path / "rigid"), "--no-deformable"],
                       cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_transform(tmp_path / "rigid" / "transform.json").grid is None
    assert list(out.glob(".tmp-*")) == []


def test_transform_round_trip_real(ct_case, tmp_path):
    known = random_known_transform(np.random.default_rng(3), ct_case["center"], ct_case["body"], peak_mm=10.0)
    _, m_lab, m_aff = make_moving(ct_case["img"], ct_case["anatomy"], ct_case["aff"], known)
    mp = compute_structures(m_lab, m_aff, ct_case["names"])
    _, _, T = register_passports(ct_case["fp"], mp)
    T2 = load_transform(T.save(tmp_path / "t.json"))
    lab, aff = ct_case["lab"], ct_case["aff"]
    assert np.array_equal(warp_labels(m_lab, m_aff, lab.shape, aff, T2), warp_labels(m_lab, m_aff, lab.shape, aff, T))
    x = ct_case["body"][::300]
    assert np.abs(T2.fixed_to_moving(x) - T.fixed_to_moving(x)).max() < 1e-3


def test_batch_mode(tmp_path, ct_case):
    assert run_batch(tmp_path / "missing")["pairs"] == []
    assert "no *_exp/*_insp" in run_batch(tmp_path)["message"]
    # one pair with label maps: registered, Dice and folding reported
    known = random_known_transform(np.random.default_rng(11), ct_case["center"], ct_case["body"], peak_mm=5.0)
    m_img, m_lab, m_aff = make_moving(ct_case["img"], ct_case["anatomy"], ct_case["aff"], known)
    case = tmp_path / "case01"
    case.mkdir()
    nib.save(nib.Nifti1Image(ct_case["img"], ct_case["aff"]), str(case / "p1_insp.nii.gz"))
    nib.save(nib.Nifti1Image(ct_case["lab"].astype(np.uint8), ct_case["aff"]), str(case / "p1_insp_seg.nii.gz"))
    nib.save(nib.Nifti1Image(m_img, m_aff), str(case / "p1_exp.nii.gz"))
    nib.save(nib.Nifti1Image(m_lab.astype(np.uint8), m_aff), str(case / "p1_exp_seg.nii.gz"))
    nib.save(nib.Nifti1Image(m_img, m_aff), str(case / "p2_exp.nii.gz"))  # unpaired: ignored
    assert [p[0] for p in find_pairs(tmp_path)] == ["case01/p1"]
    res = run_batch(tmp_path)
    (pair,) = res["pairs"]
    assert pair["time_ms"]["rigid"] > 0 and pair["jacobian"]["fraction_nonpositive"] < 0.001
    assert pair["dice"]["rigid_tps"]["mean"] > pair["dice"]["none"]["mean"]


def test_evaluate_cli_batch_only_empty(tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "registration/evaluate.py", "--batch-only", "--batch", str(tmp_path / "none"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no paired scans" in r.stdout
    assert json.loads(out.read_text(encoding="utf-8"))["batch"]["pairs"] == []


def test_non_integer_label_map_is_refused(example_ct_sm, example_seg, tmp_path):
    """A float label map with a fractional value is an InputError naming the file (never rounded silently)."""
    from common.core.errors import InputError

    seg = nib.load(str(example_seg))
    lab = np.asarray(seg.dataobj).astype(np.float32)
    lab[tuple(np.argwhere(lab > 0)[0])] += 0.5
    bad = tmp_path / "float_seg.nii.gz"
    nib.save(nib.Nifti1Image(lab, seg.affine, dtype=np.float32), str(bad))
    with pytest.raises(InputError, match="non-integer") as err:
        load_ct_and_labels(example_ct_sm, bad)
    assert str(bad) in str(err.value)
    # whole-number floats are accepted, as integers
    ok = tmp_path / "float_ok.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(lab), seg.affine, dtype=np.float32), str(ok))
    assert np.issubdtype(load_ct_and_labels(example_ct_sm, ok)[1].dtype, np.integer)


def test_evaluate_cli_breathing_family_and_decisions(example_ct_sm, example_seg, tmp_path):
    """A small evaluate.py run: a family named "breathing" with TRE per region, and per case the spline's
    held-out decision and the smoothing it chose, in the result JSON."""
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "registration/evaluate.py", "--ct", str(example_ct_sm), "--labels",
                        str(example_seg), "--magnitudes", "20", "--cases", "1", "--breathing-cases", "1",
                        "--clinical-cases", "0", "--no-dice", "--no-timing", "--points", "3000", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    results = doc["synthetic"]["example_seg"]["results"]
    assert [k for k in results if "breathing" in k] == ["breathing"]
    case = results["breathing"]["cases"][0]
    tre = case["tre_mm"]
    assert tre["lungs"]["rigid_tps"]["mean"] < tre["lungs"]["rigid"]["mean"]
    assert {"abdomen", "bone"} <= set(tre) and 10.0 <= abs(case["truth"]["breathing_cc_mm"]) <= 30.0
    for key in ("rigid_only", "peak_20mm", "breathing"):
        c = results[key]["cases"][0]
        assert c["smoothing_used"] in c["tps_validation"]["candidates"]
        assert c["tps_accepted"] is (key != "rigid_only")
        assert c["jacobian"]["fraction_nonpositive"] == 0.0
    assert results["rigid_only"]["summary"]["tps_over_rigid_mean_tre_body_per_case"] == [1.0]
    assert {row["family"] for row in doc["summary"]} == {"self", "rigid_only", "peak_20mm", "breathing"}
    assert doc["deformable_settings"]["smoothing_factors"] == [0.3, 1.0, 3.0]
    assert "breathing" in r.stdout and "TPS kept" in r.stdout


def test_clinical_variant_keeps_the_labels_on_the_scan(example_ct_sm, example_seg):
    """The clinical-size variant: 512 x 512 in-plane at 0.98 x 0.98 x 2 mm, the scan's own z extent, and the
    label map resampled onto the same grid (each structure keeps its volume and its place)."""
    from registration.eval_inputs import clinical_case

    img, lab, aff, name = clinical_case(example_ct_sm, example_seg)
    assert img.shape == lab.shape == (512, 512, 45) and name == "clinical_512x512x45"
    assert np.allclose(np.abs(np.diag(aff)[:3]), [0.98, 0.98, 2.0])
    src = nib.load(str(example_seg))
    src_lab = np.asarray(src.dataobj)
    for k in (5, 1, 52):  # liver, spleen, aorta: volume (mm^3) and centroid (mm) kept
        v_src = np.count_nonzero(src_lab == k) * 27.0
        v_new = np.count_nonzero(lab == k) * 0.98 * 0.98 * 2.0
        assert v_new == pytest.approx(v_src, rel=0.05)
        c_src = voxel_to_world(np.argwhere(src_lab == k), src.affine).mean(axis=0)
        c_new = voxel_to_world(np.argwhere(lab == k), aff).mean(axis=0)
        assert np.linalg.norm(c_new - c_src) < 1.5
    assert img[0, 0, 0] == -1024 and img[lab > 0].mean() > -200
