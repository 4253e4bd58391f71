"""Registration on small synthetic passports with exactly known answers (no CT data needed).

World coordinates are mm, RAS+; the rigid result maps MOVING world mm -> FIXED world mm.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.registration_cases import NAMES, make_passport, moved_passport

from common.records.passport_model import Structure
from registration.deformable import jacobian_stats, register_deformable, to_transform
from registration.rigid import register_rigid, rotation_angle_deg, weighted_kabsch
from registration.stability import WEIGHT_TABLE, structure_weight, weight_group
from registration.synthetic import rotation_matrix
from registration.transform import (
    invert_displacement,
)

ROOT = Path(__file__).resolve().parents[1]


def displaced(structures: list[Structure], name: str, offset_mm: list[float],
              points: bool = True) -> list[Structure]:
    """``structures`` with structure ``name`` moved by ``offset_mm`` (a mislabelled structure): its centroid
    and, with ``points``, its boundary points."""
    return [s.replace(centroid_mm=s.centroid_mm + offset_mm,
                      boundary_points_mm=s.boundary_points_mm + offset_mm if points else s.boundary_points_mm)
            if s.name == name else s for s in structures]


def angle_between(Ra: np.ndarray, Rb: np.ndarray) -> float:
    return rotation_angle_deg(Ra.T @ Rb)


# ---- weights ----------------------------------------------------------------------------------

def test_weight_table_groups():
    assert structure_weight("vertebrae_L3") == 1.0
    assert structure_weight("sacrum") == 1.0 and structure_weight("hip_left") == 1.0
    assert structure_weight("rib_left_4") == 0.9
    assert structure_weight("liver") == 0.6 and structure_weight("kidney_right") == 0.6
    assert structure_weight("lung_upper_lobe_left") == 0.4
    assert structure_weight("something_unknown") == 0.5
    assert weight_group("spleen") == "solid_organ"
    custom = (("bones", 2.0, ("vertebrae_*",)),) + tuple(WEIGHT_TABLE)
    assert structure_weight("vertebrae_L3", custom) == 2.0


# ---- rigid ------------------------------------------------------------------------------------

def test_weighted_kabsch_exact_and_weights():
    rng = np.random.default_rng(1)
    P = rng.normal(size=(10, 3)) * 50
    R = rotation_matrix([1, 2, 3], 25.0)
    t = np.array([5.0, -3.0, 12.0])
    Q = P @ R.T + t
    R_est, t_est = weighted_kabsch(P, Q, rng.uniform(0.1, 1.0, size=10))
    assert np.allclose(R_est, R, atol=1e-10) and np.allclose(t_est, t, atol=1e-8)
    assert np.isclose(np.linalg.det(R_est), 1.0)
    # a zero-weight point is ignored completely
    Q2 = Q.copy()
    Q2[0] += 100.0
    w = np.ones(10)
    w[0] = 0.0
    R2, t2 = weighted_kabsch(P, Q2, w)
    assert np.allclose(R2, R, atol=1e-10) and np.allclose(t2, t, atol=1e-8)


@pytest.mark.parametrize("angle,axis,shift", [(15.0, [0, 0, 1], [30.0, 0, 0]), (10.0, [1, 1, 0], [-12.0, 25.0, 8.0]),
                                              (3.0, [0.2, -1, 0.5], [0.0, 0.0, -30.0])])
def test_rigid_recovers_known_transform(angle, axis, shift):
    fixed = make_passport(0)
    R = rotation_matrix(axis, angle)
    t = np.asarray(shift, dtype=np.float64)
    res = register_rigid(fixed, moved_passport(fixed, R, t))
    assert angle_between(res.rotation, R) < 0.5
    pts = np.array([s.centroid_mm for s in fixed])
    moving_pts = (pts - t) @ R
    assert np.abs(res.apply(moving_pts) - pts).max() < 0.5
    assert res.outliers == []
    assert res.n_axis_points > 0
    assert res.time_ms > 0


def test_rigid_self_registration_is_exact():
    fixed = make_passport(2)
    res = register_rigid(fixed, fixed)
    pts = np.concatenate([s.boundary_points_mm for s in fixed])
    assert np.linalg.norm(res.apply(pts) - pts, axis=1).max() < 0.01
    assert max(res.residuals_mm.values()) < 1e-6


def test_rigid_robust_to_mislabelled_structure():
    fixed = make_passport(3)
    R = rotation_matrix([0.3, 1, 0.2], 12.0)
    t = np.array([10.0, -20.0, 15.0])
    moving = displaced(moved_passport(fixed, R, t), "kidney_left", [0.0, 50.0, 0.0], points=False)  # mislabelled
    res = register_rigid(fixed, moving)
    assert "kidney_left" in res.outliers
    assert res.outliers == ["kidney_left"]
    assert res.residuals_mm["kidney_left"] > 40.0
    assert angle_between(res.rotation, R) < 0.5
    pts = np.array([s.centroid_mm for s in fixed])
    assert np.abs(res.apply((pts - t) @ R) - pts).max() < 0.5


def test_rigid_robust_to_missing_structures():
    fixed = make_passport(4)
    R = rotation_matrix([1, 0, 0], 8.0)
    t = np.array([0.0, 5.0, -5.0])
    moving = moved_passport(fixed, R, t)
    moving = [s for s in moving if s.name not in ("liver", "vertebrae_L1")]
    fixed.append(fixed[0].replace(name="only_in_fixed"))
    res = register_rigid(fixed, moving)
    assert "liver" not in res.residuals_mm and "only_in_fixed" not in res.residuals_mm
    assert angle_between(res.rotation, R) < 0.5


def test_rigid_two_structures_use_axes():
    """With two structures the centroids alone cannot fix the rotation; principal axes do."""
    fixed = make_passport(5, names=["liver", "spleen"])
    R = rotation_matrix([0, 1, 1], 10.0)
    t = np.array([3.0, 4.0, 5.0])
    res = register_rigid(fixed, moved_passport(fixed, R, t))
    assert angle_between(res.rotation, R) < 0.5


def test_rigid_no_common_structure():
    with pytest.raises(ValueError, match="share no structure"):
        register_rigid(make_passport(0, names=["liver"]), make_passport(0, names=["spleen"]))


# ---- deformable + transform -------------------------------------------------------------------

def test_deformable_self_registration_is_zero():
    fixed = make_passport(6)
    rigid = register_rigid(fixed, fixed)
    defo = register_deformable(fixed, fixed, rigid)
    assert np.abs(defo.grid.fixed_to_moving).max() < 0.01
    T = to_transform(rigid, defo)
    pts = np.concatenate([s.boundary_points_mm for s in fixed])
    assert np.linalg.norm(T.fixed_to_moving(pts) - pts, axis=1).max() < 0.01
    assert np.linalg.norm(T.moving_to_fixed(pts) - pts, axis=1).max() < 0.01
    assert jacobian_stats(defo.grid)["fraction_nonpositive"] == 0.0


def test_deformable_rigid_truth_stays_rigid():
    """Noise-free rigid truth: the spline must not invent a deformation."""
    fixed = make_passport(7)
    R = rotation_matrix([1, 2, 0], 7.0)
    t = np.array([4.0, -6.0, 9.0])
    moving = moved_passport(fixed, R, t)
    rigid = register_rigid(fixed, moving)
    T = to_transform(rigid, register_deformable(fixed, moving, rigid))
    pts = np.array([s.centroid_mm for s in fixed])
    assert np.linalg.norm(T.fixed_to_moving(pts) - (pts - t) @ R, axis=1).max() < 0.5


@pytest.mark.parametrize("symmetric", [False, True])
def test_deformable_reduces_error_of_smooth_deformation(symmetric):
    """Synthetic ellipsoids displaced by a smooth Gaussian field: rigid + TPS beats rigid alone (point-to-plane
    along the fixed normal, and symmetric)."""
    fixed = make_passport(8, n_points=400)
    R = rotation_matrix([0, 0, 1], 5.0)
    t = np.array([5.0, 0.0, 0.0])
    c0, amp, sig = np.array([0.0, 0.0, 0.0]), np.array([0.0, 8.0, 4.0]), 80.0

    def fixed_to_moving(x):  # truth: x -> moving, a smooth bump then the rigid change of frame
        x = np.atleast_2d(x)
        z = x + np.exp(-np.sum((x - c0) ** 2, axis=1) / (2 * sig ** 2))[:, None] * amp
        return (z - t) @ R

    moving = [s.replace(centroid_mm=fixed_to_moving(s.centroid_mm)[0], eigenvectors=R.T @ s.eigenvectors,
                        boundary_points_mm=fixed_to_moving(s.boundary_points_mm)) for s in fixed]
    rigid = register_rigid(fixed, moving, residual_threshold_mm=30.0)
    T = to_transform(rigid, register_deformable(fixed, moving, rigid, symmetric=symmetric))
    pts = np.concatenate([s.boundary_points_mm[::10] for s in fixed])
    truth = fixed_to_moving(pts)
    err_rigid = np.linalg.norm(T.rigid_only().fixed_to_moving(pts) - truth, axis=1).mean()
    err_tps = np.linalg.norm(T.fixed_to_moving(pts) - truth, axis=1).mean()
    assert err_tps < 0.5 * err_rigid


def test_deformable_ignores_rigid_outlier():
    """A mislabelled structure (50 mm off) is flagged by the rigid tier and kept out of the spline."""
    fixed = make_passport(9)
    R = rotation_matrix([0, 1, 0], 6.0)
    t = np.array([2.0, 3.0, -4.0])
    moving = displaced(moved_passport(fixed, R, t), "spleen", [50.0, 0.0, 0.0])
    rigid = register_rigid(fixed, moving)
    assert rigid.outliers == ["spleen"]
    defo = register_deformable(fixed, moving, rigid)
    assert "spleen" in defo.structures_excluded and "spleen" not in defo.structures_used
    T = to_transform(rigid, defo)
    pts = np.concatenate([s.boundary_points_mm for s in fixed if s.name != "spleen"])
    assert np.linalg.norm(T.fixed_to_moving(pts) - (pts - t) @ R, axis=1).max() < 0.5


def test_deformable_phases_on_their_own():
    """The phases of register_deformable, called one by one, give its grid exactly; each checked on its own."""
    from registration.correspondence import match_step, select_structures, surface_points
    from registration.deformable import linearised_round
    from registration.options import DeformableOptions
    from registration.spline import control_cells, displacement_grid, initial_field
    from registration.spline_system import NodeSpline, SplineSystem
    from registration.validation import block_folds, cross_validate

    fixed = make_passport(9)
    R, t = rotation_matrix([0, 1, 0], 6.0), np.array([2.0, 3.0, -4.0])
    moving = displaced(moved_passport(fixed, R, t), "spleen", [50.0, 0.0, 0.0])  # mislabelled: 50 mm off
    rigid = register_rigid(fixed, moving)
    o = DeformableOptions(max_control_points=60, iterations=2)
    # point selection: the rigid-frame centroids agree, the mislabelled structure is left out
    sel = select_structures(fixed, moving, rigid, o)
    assert "spleen" in sel.excluded and len(sel.used) == len(NAMES) - 1
    assert np.abs(sel.moving_centroids - sel.fixed_centroids).max() < 0.5
    surf = surface_points(sel, o)
    assert len(surf.points) == sum(len(p) for p in sel.fixed_points)
    assert np.allclose(np.linalg.norm(surf.normals, axis=1), 1.0)
    # control points: within the budget (cells + centroids)
    cf = sel.fixed_centroids
    cells = control_cells(surf.points, surf.owner, len(cf), o)
    assert not cells.floor_applied and cells.n_cells + len(cf) <= 60
    assert cells.centres.shape == (cells.n_cells, 3)
    # the linearised rounds: a rigid truth leaves (almost) nothing to correct
    d_c = sel.moving_centroids - cf
    nodes = np.concatenate([cells.centres, cf])
    system = SplineSystem(nodes, np.concatenate([np.bincount(cells.cell).astype(float), np.ones(len(cf))]))
    tps0, _ = initial_field(cf, d_c, cells.centres, o.centroid_smoothing)
    F0 = tps0(nodes)
    F = F0.copy()
    for _ in range(o.iterations):
        c = match_step(surf, cells.cell, cells.n_cells, F[:cells.n_cells], o)
        assert c.n_matches > 0.5 * len(surf.points) and np.abs(c.correction).max() < 0.5
        data = linearised_round(c, F, d_c, 1.0, o.trust_damping)
        F, info = system.solve(data, o.smoothing, F)
        assert info == 0
    # the check: a rigid pair gains nothing from the spline on held-out matches, so it is dropped
    v = cross_validate(system, data, block_folds(cells.centres, o.cv_folds, o.cv_block_mm),
                       [o.smoothing * f for f in o.smoothing_factors], F0, c.n_accepted, o.accept_margin,
                       o.accept_min_gain_mm, precondition_with=o.smoothing)
    assert not v.accepted and v.chosen in v.candidates
    if v.chosen != o.smoothing:
        F, _ = system.solve(data, v.chosen, F, precondition_with=o.smoothing)
    F = np.zeros_like(F)  # dropped: a zero field
    # displacement grid and its inverse
    grid = displacement_grid(NodeSpline(system, F), [*sel.fixed_points, *sel.moving_points, cf,
                                                     sel.moving_centroids], d_c, o)
    grid.moving_to_fixed = invert_displacement(grid)
    assert np.abs(grid.fixed_to_moving).max() == 0.0
    whole = register_deformable(fixed, moving, rigid, o)
    assert not whole.accepted and whole.validation["accepted"] is False
    assert np.array_equal(grid.fixed_to_moving, whole.grid.fixed_to_moving)
    assert np.array_equal(grid.moving_to_fixed, whole.grid.moving_to_fixed)


def test_rigid_result_dict_is_json_ready():
    fixed = make_passport(10)
    res = register_rigid(fixed, moved_passport(fixed, rotation_matrix([1, 0, 0], 4.0), np.array([1.0, 2.0, 3.0])))
    d = json.loads(json.dumps(res.to_dict()))
    assert d["n_matched"] == len(NAMES) and d["settings"]["groups"]["liver"] == "solid_organ"
    assert d["weights"]["vertebrae_L1"] > d["weights"]["lung_lower_lobe_left"]
    assert abs(d["rotation_angle_deg"] - 4.0) < 0.01


def test_symmetric_normals_vanish_between_points_of_one_sphere():
    """Rusinkiewicz's symmetric objective: for two nearby points p, q of one sphere (normals radial),
    (q - p) . (n_p + n_q) = 0, while the fixed normal alone gives a residual; a flipped moving normal is turned
    back, and a missing (zero) normal leaves the fixed one."""
    from registration.correspondence import symmetric_normals

    rng = np.random.default_rng(0)
    p = rng.normal(size=(50, 3))
    q = p + rng.normal(size=(50, 3)) * 0.3  # neighbours, as matches are (normals within about 30 degrees)
    p *= 30.0 / np.linalg.norm(p, axis=1, keepdims=True)
    q *= 30.0 / np.linalg.norm(q, axis=1, keepdims=True)
    n_p, n_q = p / 30.0, q / 30.0
    flip = np.where(rng.random(50) < 0.5, -1.0, 1.0)[:, None]  # PCA normals have no sign
    n = symmetric_normals(n_p, flip * n_q)
    assert np.allclose(np.linalg.norm(n, axis=1), 1.0)
    assert np.abs(np.einsum("ij,ij->i", q - p, n)).max() < 1e-9
    assert np.abs(np.einsum("ij,ij->i", q - p, n_p)).max() > 1.0
    n_q[:5] = 0.0
    assert np.allclose(symmetric_normals(n_p, n_q)[:5], n_p[:5])


def test_symmetric_matching_keeps_self_registration_exact():
    fixed = make_passport(6)
    defo = register_deformable(fixed, fixed, register_rigid(fixed, fixed), symmetric=True)
    assert np.abs(defo.grid.fixed_to_moving).max() < 0.01
    assert defo.settings["symmetric"] is True
