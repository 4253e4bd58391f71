"""Registration transforms: displacement-grid inversion, JSON storage, warping, and the register.py command line.

World coordinates are mm, RAS+; arrays are (x, y, z).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from registration.deformable import jacobian_stats
from registration.synthetic import rotation_matrix
from registration.transform import (
    DisplacementGrid,
    Transform,
    decode_array,
    encode_array,
    invert_displacement,
    load_transform,
    warp_image,
    warp_labels,
)

ROOT = Path(__file__).resolve().parents[1]


def test_invert_displacement_is_inverse():
    shape = (12, 10, 8)
    origin = np.array([-50.0, -40.0, -30.0])
    spacing = np.array([10.0, 10.0, 10.0])
    grid = DisplacementGrid(origin, spacing, np.zeros(shape + (3,)))
    nodes = grid.nodes_mm()
    u = 4.0 * np.exp(-np.sum((nodes - [5, 0, 5]) ** 2, axis=1) / (2 * 30.0 ** 2))[:, None] * np.array([1.0, 0.5, 0])
    grid.fixed_to_moving = u.reshape(shape + (3,))
    grid.moving_to_fixed = invert_displacement(grid)
    x = np.random.default_rng(0).uniform(origin + 10, origin + spacing * (np.array(shape) - 2), size=(200, 3))
    p = x + grid.sample_u(x)
    assert np.abs(p + grid.sample_v(p) - x).max() < 0.15  # interpolation error of u and v (inside the grid)
    T = Transform(np.eye(3), np.zeros(3), grid)
    assert np.abs(T.moving_to_fixed(T.fixed_to_moving(x)) - x).max() < 1e-3  # refined inverse
    assert jacobian_stats(grid)["fraction_nonpositive"] == 0.0


def make_transform_with_grid() -> Transform:
    shape = (6, 5, 4)
    grid = DisplacementGrid(np.array([-60.0, -50.0, -40.0]), np.array([25.0, 25.0, 25.0]), np.zeros(shape + (3,)))
    nodes = grid.nodes_mm()
    grid.fixed_to_moving = (3.0 * np.sin(nodes / 40.0)).reshape(shape + (3,))
    grid.moving_to_fixed = invert_displacement(grid)
    return Transform(rotation_matrix([1, 1, 1], 9.0), np.array([1.0, 2.0, 3.0]), grid, {"note": "test"})


def test_transform_json_round_trip(tmp_path):
    T = make_transform_with_grid()
    path = T.save(tmp_path / "transform.json")
    T2 = load_transform(path)
    pts = np.random.default_rng(0).uniform(-60, 60, size=(50, 3))
    assert np.abs(T2.fixed_to_moving(pts) - T.fixed_to_moving(pts)).max() < 1e-4
    assert np.abs(T2.moving_to_fixed(pts) - T.moving_to_fixed(pts)).max() < 1e-4
    assert T2.meta == {"note": "test"}
    d = json.loads(path.read_text(encoding="utf-8"))
    assert d["schema"] == "registration-transform" and "base64" in d["deformable"]["fixed_to_moving"]["displacement_mm"]
    assert list(tmp_path.glob(".tmp-*")) == []
    # rigid-only transforms round-trip too
    R = Transform(rotation_matrix([0, 0, 1], 30.0), np.array([5.0, 0, 0]))
    R2 = load_transform(R.save(tmp_path / "rigid.json"))
    assert R2.grid is None and np.allclose(R2.rotation, R.rotation) and np.allclose(R2.translation, R.translation)


def test_encode_decode_array():
    a = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7
    assert np.allclose(decode_array(encode_array(a)), a, atol=1e-6)


def test_load_transform_bad_file(tmp_path):
    from common.core.errors import InputError
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="bad.json"):
        load_transform(bad)
    with pytest.raises(InputError, match="not found"):
        load_transform(tmp_path / "missing.json")


def test_fixed_to_moving_and_back_are_inverse():
    T = make_transform_with_grid()
    x = np.random.default_rng(1).uniform(-40, 40, size=(100, 3))
    assert np.abs(T.moving_to_fixed(T.fixed_to_moving(x)) - x).max() < 1e-3


def test_identity_label_warp_is_exact():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, size=(17, 13, 11)).astype(np.uint8)
    affine = np.array([[1.5, 0, 0, -10.0], [0, 2.0, 0, 5.0], [0, 0, 3.0, 7.0], [0, 0, 0, 1]])
    out = warp_labels(labels, affine, labels.shape, affine, Transform.identity())
    assert out.dtype == labels.dtype and np.array_equal(out, labels)
    img = rng.normal(size=labels.shape).astype(np.float32)
    assert np.allclose(warp_image(img, affine, img.shape, affine, Transform.identity()), img, atol=1e-5)


def test_label_warp_known_shift():
    """A moving scan whose grid is shifted by whole voxels: the warp pulls labels back onto the fixed grid."""
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[3:6, 4:7, 2:5] = 7
    fixed_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    moving_aff = fixed_aff.copy()
    moving_aff[:3, 3] = [-4.0, 0.0, 0.0]  # moving voxel i sits at x = 2 i - 4
    moving_labels = np.zeros_like(labels)
    moving_labels[5:8, 4:7, 2:5] = 7  # the same object, i + 2 in the moving grid
    # same world position of the object -> identity transform in world terms
    out = warp_labels(moving_labels, moving_aff, labels.shape, fixed_aff, Transform.identity())
    assert np.array_equal(out, labels)
    # a known rigid shift: the object moved +6 mm in x in the moving scan; T maps moving -> fixed
    moved = np.zeros_like(labels)
    moved[6:9, 4:7, 2:5] = 7
    T = Transform(np.eye(3), np.array([-6.0, 0.0, 0.0]))
    assert np.array_equal(warp_labels(moved, fixed_aff, labels.shape, fixed_aff, T), labels)


# ---- CLI --------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "registration/register.py", *args], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=120)


def test_register_cli_help():
    r = run_cli("--help")
    assert r.returncode == 0 and "--fixed-passport" in r.stdout and "--no-deformable" in r.stdout


def test_register_cli_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    r = run_cli("--fixed-passport", str(bad), "--moving-passport", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad.json" in lines[0]
    r = run_cli("--fixed-passport", str(tmp_path / "nope.json"), "--moving-passport", str(bad),
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "nope.json" in r.stderr and "Traceback" not in r.stderr
