"""The deformable tier's own check (registration/validation.py) and the breathing truth (registration/breathing.py).

The check never sees the truth: it holds out control cells, fits the spline without them and compares their
point-to-plane residuals (mm) with the rigid result's. Real-CT cases use the harness's seeds and the shared CT
with its official 1.5 mm-model label map. World coordinates are mm, RAS+.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers.registration_cases import real_ct_case

from common.imaging.geometry import voxel_to_world
from registration.breathing import breathing_field, label_mask, random_breathing_transform, smoothstep
from registration.harness import evaluate_case
from registration.spline_system import LinearisedData, SplineSystem
from registration.synthetic import random_known_transform
from registration.validation import block_folds, cross_validate


@pytest.fixture(scope="module")
def ct_case(example_ct_sm, example_seg):
    return real_ct_case(example_ct_sm, example_seg)


def run_case(ct: dict, known) -> dict:
    return evaluate_case(ct["img"], ct["anatomy"], ct["aff"], ct["names"], known, fixed_labels=ct["lab"],
                         fixed_passport=ct["fp"], n_points=4000, with_dice=False)


# ---- accept / reject on the real CT -----------------------------------------------------------------------------

def test_tps_dropped_on_a_rigid_pair_and_kept_on_a_deformed_one(ct_case):
    """Rigid truth (<= 15 deg, <= 30 mm; the harness's first rigid case, the one whose surfaces disagree most):
    the spline is dropped and the result is exactly the rigid one. 20 mm deformation: kept, and it helps."""
    rigid_truth = random_known_transform(np.random.default_rng([0, 0, 0]), ct_case["center"], ct_case["body"],
                                         peak_mm=0.0)
    res = run_case(ct_case, rigid_truth)
    v = res["tps_validation"]
    assert res["tps_accepted"] is False and v["accepted"] is False
    assert v["cv_over_rigid"] > 1.0 - 0.3  # the held-out residual is not lowered enough
    for key in ("body", "inside", "lungs", "bone"):
        assert res["tre_mm"][key]["rigid_tps"]["mean"] == res["tre_mm"][key]["rigid"]["mean"]
    assert res["jacobian"]["det_min"] == pytest.approx(1.0)

    deformed = random_known_transform(np.random.default_rng([0, 3, 0]), ct_case["center"], ct_case["body"],
                                      peak_mm=20.0)
    res = run_case(ct_case, deformed)
    v = res["tps_validation"]
    assert res["tps_accepted"] is True and v["accepted"] is True and v["cv_over_rigid"] < 0.3
    assert res["smoothing_used"] == v["smoothing_chosen"] and v["smoothing_chosen"] in v["candidates"]
    body = res["tre_mm"]["body"]
    assert body["rigid_tps"]["mean"] < 0.35 * body["rigid"]["mean"]
    assert res["jacobian"]["det_min"] > 0.0 and res["jacobian"]["fraction_nonpositive"] == 0.0


# ---- the smoothing choice on a controlled problem -------------------------------------------------------------

def _problem(noise_mm: float, amplitude_mm: float, seed: int = 0) -> tuple[SplineSystem, LinearisedData, np.ndarray]:
    """Nodes in a 300 mm box, 12 matches each with random unit normals, linearised at zero: residuals are the
    normal components of a smooth 3-D field (one Gaussian of ``amplitude_mm``, sigma 80 mm) plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    nodes = rng.uniform(-150, 150, size=(300, 3))
    u = amplitude_mm * np.exp(-np.sum(nodes ** 2, axis=1) / (2 * 80.0 ** 2))[:, None] * np.array([0.6, -0.3, 0.74])
    n = rng.normal(size=(300, 12, 3))
    n /= np.linalg.norm(n, axis=2, keepdims=True)
    r = np.einsum("kmi,ki->km", n, u) + rng.normal(scale=noise_mm, size=(300, 12))
    A = np.einsum("kmi,kmj->kij", n, n) + 1e-3 * 12 * np.eye(3)
    data = LinearisedData(A, np.einsum("km,kmi->ki", r, n), np.zeros((300, 3)), np.sum(r * r, axis=1))
    return SplineSystem(nodes, np.full(300, 12.0)), data, nodes


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_validation_chooses_more_smoothing_for_noisier_matches(seed):
    candidates = [1e2, 1e3, 1e4, 1e5, 1e6, 1e7]
    chosen = {}
    for noise in (0.05, 1.0):
        system, data, nodes = _problem(noise, 8.0, seed)
        v = cross_validate(system, data, block_folds(nodes, 5, 40.0, seed=seed), candidates, np.zeros((300, 3)),
                           np.full(300, 12.0), margin=0.3, min_gain_mm=0.05)
        assert v.accepted, v.to_dict()  # an 8 mm field is there to be found
        best = candidates.index(v.chosen)
        assert v.cv_energy[best] == min(v.cv_energy)  # the argmin is the choice
        assert v.cv_energy[0] > v.cv_energy[best] < v.cv_energy[-1]  # an interior minimum: both ends are worse
        chosen[noise] = (v.chosen, v.to_dict()["cv_rms_mm"][best])
    assert chosen[1.0][0] > chosen[0.05][0]
    assert 0.9 < chosen[1.0][1] < 1.2  # at the chosen smoothing the held-out residual is about the noise


def test_cross_validation_rejects_pure_noise():
    system, data, nodes = _problem(1.0, 0.0)
    v = cross_validate(system, data, block_folds(nodes, 5, 40.0), [1e3, 1e4, 1e5], np.zeros((300, 3)),
                       np.full(300, 12.0), margin=0.3, min_gain_mm=0.05)
    assert not v.accepted and v.cv_over_rigid > 0.7
    d = v.to_dict()
    assert d["accepted"] is False and len(d["cv_rms_mm"]) == 3 and d["rigid_rms_mm"] == pytest.approx(1.0, rel=0.1)


def test_block_folds_are_spatial_and_balanced():
    pts = np.random.default_rng(0).uniform(0, 400, size=(2000, 3))
    folds = block_folds(pts, 5, 40.0)
    assert set(folds.tolist()) == set(range(5))
    same_block = np.floor((pts - pts.min(axis=0)) / 40.0)  # cubes from the lowest corner of the points
    key = [tuple(k) for k in same_block.astype(int)]
    by_block: dict = {}
    for k, f in zip(key, folds, strict=True):
        by_block.setdefault(k, set()).add(int(f))
    assert all(len(v) == 1 for v in by_block.values())  # one fold per 40 mm cube
    counts = np.bincount(folds)
    assert counts.min() > 0.6 * counts.max()


# ---- the breathing truth ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def breathing(ct_case):
    c = ct_case
    template = breathing_field(c["lab"], c["aff"], c["names"], c["body"])
    known = random_breathing_transform(np.random.default_rng([0, 4, 0]), c["center"], c["body"], template)
    return template, known


def _voxels(ct: dict, patterns: tuple[str, ...]) -> np.ndarray:
    return voxel_to_world(np.argwhere(label_mask(ct["lab"], ct["names"], patterns)), ct["aff"])


def test_breathing_is_zero_at_the_spine_and_far_from_the_lungs(ct_case, breathing):
    template, known = breathing
    field = known.field
    assert 10.0 <= abs(field.cc_mm) <= 30.0 and 4.0 <= abs(field.ap_mm) <= 10.0
    spine = _voxels(ct_case, ("vertebrae_*", "spinal_cord"))
    assert len(spine) > 100 and np.abs(field(spine)).max() == 0.0
    lungs = _voxels(ct_case, ("lung_*",))
    # far from the lungs: every lung voxel moved down by the lungs' height plus twice the decay length (the AP
    # part's), and the body 400 mm down (beyond the distance map: its edge value)
    drop = np.ptp(lungs[:, 2]) + 2.0 * field.decay_mm + 3.0
    far = np.concatenate([ct_case["body"][::50] - [0.0, 0.0, 400.0], lungs[::10] - [0.0, 0.0, drop]])
    assert np.abs(field(far)).max() == 0.0
    # ... and exactly zero cranio-caudally from one decay length on
    assert np.abs(field(lungs[::10] - [0.0, 0.0, np.ptp(lungs[:, 2]) + field.decay_mm + 3.0])[:, 2]).max() == 0.0
    # the lungs move (cranio-caudal, most of the shift), the spine and paraspinal muscles much less
    d_lungs = np.abs(field(lungs)[:, 2])
    assert np.median(d_lungs) > 0.5 * abs(field.cc_mm)
    muscles = _voxels(ct_case, ("autochthon_*",))
    assert np.median(np.abs(field(muscles)[:, 2])) < 0.25 * np.median(d_lungs)


def test_breathing_slides_at_the_lung_boundary_and_does_not_fold(ct_case, breathing):
    template, known = breathing
    body = ct_case["body"][::7]
    assert known.det_min(body) > 0.2  # invertible truth, although its shear exceeds 1 at the sliding boundary
    assert known.max_gradient(body) > 1.0
    x = ct_case["body"][::97]
    assert np.abs(known.moving_to_fixed(known.fixed_to_moving(x)) - x).max() < 1e-4
    # the sliding map is 1 deep inside the organ outline, 0 far outside it and on the spine
    assert template.slide(_voxels(ct_case, ("liver",))).mean() > 0.95
    assert template.slide(_voxels(ct_case, ("vertebrae_*",))).max() == 0.0
    assert smoothstep(np.array([-1.0, 0.0, 0.5, 1.0, 2.0])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_breathing_case_rigid_tps_beats_rigid_in_the_lungs(ct_case, breathing):
    _, known = breathing
    res = run_case(ct_case, known)
    tre = res["tre_mm"]
    assert tre["lungs"]["none"]["n"] > 100 and tre["abdomen"]["none"]["n"] > 100 and tre["bone"]["none"]["n"] > 100
    assert res["tps_accepted"] is True
    assert tre["lungs"]["rigid_tps"]["mean"] < 0.7 * tre["lungs"]["rigid"]["mean"]
    assert res["jacobian"]["fraction_nonpositive"] == 0.0
    assert res["truth"]["breathing_cc_mm"] == known.field.cc_mm
