"""Folding statistics stay JSON-valid: no NaN from registration.deformable.jacobian_stats reaches a JSON writer.

Grids are (nx, ny, nz, 3) displacement fields in mm on nodes origin + ijk * spacing (world mm, RAS+).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.registration_cases import make_passport

import registration.deformable as deformable
from registration.accuracy import summarise_cases
from registration.rigid import register_rigid
from registration.transform import DisplacementGrid


def _grid(u_of_x) -> DisplacementGrid:
    """A 5 x 5 x 5 grid at 2 mm spacing with u(x) (mm) given as a function of the node positions (mm)."""
    g = DisplacementGrid(np.zeros(3), np.full(3, 2.0), np.zeros((5, 5, 5, 3)))
    x = np.stack(np.meshgrid(*[2.0 * np.arange(5)] * 3, indexing="ij"), axis=-1)
    g.fixed_to_moving = u_of_x(x)
    return g


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # det of a NaN field, on purpose
@pytest.mark.parametrize("case", ["folded_everywhere", "nan_field"])
def test_jacobian_stats_are_json_valid_for_degenerate_fields(case):
    # x -> x - 2x = -x: det(J) = -1 at every node, so no node has log det(J); a NaN field has no finite det(J)
    u = (lambda x: -2.0 * x) if case == "folded_everywhere" else (lambda x: np.full(x.shape, np.nan))
    stats = deformable.jacobian_stats(_grid(u))
    json.dumps(stats, allow_nan=False)  # raised ValueError before the fix (log_det_std NaN)
    assert stats["fraction_nonpositive"] == 1.0
    assert stats["log_det_std"] is None
    assert stats["det_min"] == (-1.0 if case == "folded_everywhere" else None)


def test_jacobian_stats_unchanged_for_a_normal_field():
    stats = deformable.jacobian_stats(_grid(lambda x: 0.01 * x))  # det(J) = 1.01^3 everywhere
    assert stats["fraction_nonpositive"] == 0.0
    assert stats["det_min"] == pytest.approx(1.01 ** 3)
    assert stats["log_det_std"] == pytest.approx(0.0, abs=1e-12)


def test_summary_of_cases_with_no_defined_log_det():
    case = {"tre_mm": {"body": {e: {"mean": 1.0, "p95": 1.0, "max": 1.0} for e in ("none", "rigid", "rigid_tps")}},
            "time_ms": {"rigid": 1.0, "tps": 1.0},
            "jacobian": {"fraction_nonpositive": 1.0, "fraction_nonpositive_body_points": 1.0,
                         "log_det_std": None, "det_min": None}}
    s = summarise_cases([case, case])
    assert s["jacobian"]["log_det_std_mean"] is None and s["jacobian"]["det_min"] is None
    json.dumps(s, allow_nan=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_non_finite_spline_is_dropped_and_the_result_is_json_valid(monkeypatch):
    """A spline whose values turn NaN (e.g. an ill-conditioned system) must not leave a NaN grid: before the
    fix the folding loop compared NaN <= 0 (False), kept the NaN field and to_dict() held NaN."""
    fixed = make_passport(0)
    moving = [s.replace(boundary_points_mm=s.boundary_points_mm * [1.03, 1.0, 0.98]) for s in fixed]
    rigid = register_rigid(fixed, moving)
    real = deformable.NodeSpline

    class NanSpline(real):
        def __call__(self, x):
            out = super().__call__(x)
            return out if not np.any(self.weights) else np.full_like(out, np.nan)

    monkeypatch.setattr(deformable, "NodeSpline", NanSpline)
    res = deformable.register_deformable(fixed, moving, rigid, validate=False)
    assert np.all(np.isfinite(res.grid.fixed_to_moving))
    assert not res.accepted
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["jacobian"]["fraction_nonpositive"] == 0.0
