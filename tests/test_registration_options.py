"""Registration options: the recorded settings rebuild the options, and re-running gives the same transform.

World coordinates are mm, RAS+; the transform maps MOVING world mm -> FIXED world mm.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
from helpers.registration_cases import make_passport, moved_passport

from common.records.passport import build_passport, save_passport
from registration.deformable import register_deformable
from registration.inputs import load_checked_passport
from registration.options import DeformableOptions, RigidOptions
from registration.register import main as register_main
from registration.rigid import register_rigid
from registration.synthetic import rotation_matrix
from registration.transform import load_transform
from registration.two_tier import register_passports


def ellipsoid_labels(shape=(48, 44, 40), n_labels: int = 10, seed: int = 0) -> np.ndarray:
    """An (x, y, z) label map of ``n_labels`` seeded, non-overlapping-ish ellipsoids."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, dtype=np.uint8)
    ijk = np.indices(shape).reshape(3, -1).T
    for label in range(1, n_labels + 1):
        c = rng.uniform(8, np.array(shape) - 8)
        r = rng.uniform(3, 7, size=3)
        inside = (((ijk - c) / r) ** 2).sum(axis=1) <= 1.0
        lab.reshape(-1)[inside] = label
    return lab


@pytest.fixture(scope="module")
def passport_files(tmp_path_factory):
    """Fixed and moving passports of one label map: the moving grid is rotated 3 deg and shifted (mm)."""
    lab = ellipsoid_labels()
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    moved = np.eye(4)
    moved[:3, :3] = rotation_matrix([0.3, 0.1, 1.0], 3.0)
    moved[:3, 3] = [5.0, -3.0, 4.0]
    names = {i: f"structure_{i}" for i in range(1, 11)}
    d = tmp_path_factory.mktemp("options")
    a = save_passport(build_passport(lab, aff, names, scan={}, model={}, resolution="original"), d / "A.json")
    b = save_passport(build_passport(lab, moved @ aff, names, scan={}, model={}, resolution="original"), d / "B.json")
    return a, b


def test_registration_json_rebuilds_the_options_and_the_transform(passport_files, tmp_path):
    a, b = passport_files
    out = tmp_path / "r"
    assert register_main(["--fixed-passport", str(a), "--moving-passport", str(b), "--out", str(out),
                          "--smoothing", "5000", "--max-control-points", "60", "--residual-threshold", "12"]) == 0
    saved = json.loads((out / "registration.json").read_text(encoding="utf-8"))
    rigid_options = RigidOptions(**saved["settings"]["rigid_options"])
    deformable_options = DeformableOptions(**saved["settings"]["deformable_options"])
    assert rigid_options.residual_threshold_mm == 12.0 and deformable_options.smoothing == 5000.0
    assert deformable_options.max_control_points == 60 and deformable_options.bbox_mm is not None
    # every field is recorded, those the old settings left out included
    for key in ("min_points_per_structure", "min_voxels", "bbox_mm"):
        assert key in saved["settings"]["deformable_options"] and key in saved["deformable"]["settings"]
    assert DeformableOptions.from_record(saved["deformable"]["settings"]) == deformable_options
    assert RigidOptions.from_record(saved["rigid"]["settings"]) == rigid_options

    rigid, defo, T = register_passports(load_checked_passport(a), load_checked_passport(b), rigid_options,
                                        deformable_options)
    stored = load_transform(out / "transform.json")  # displacements stored as float32
    assert np.array_equal(stored.rotation, T.rotation) and np.array_equal(stored.translation, T.translation)
    assert np.array_equal(stored.grid.origin, T.grid.origin) and np.array_equal(stored.grid.spacing, T.grid.spacing)
    assert np.array_equal(stored.grid.fixed_to_moving, T.grid.fixed_to_moving.astype(np.float32))
    assert np.array_equal(stored.grid.moving_to_fixed, T.grid.moving_to_fixed.astype(np.float32))
    assert defo.n_control_points == saved["deformable"]["n_control_points"]
    assert json.loads(json.dumps(defo.to_dict()["settings"])) == saved["deformable"]["settings"]


def test_result_settings_rebuild_the_options_exactly():
    """Non-default options through the API: settings -> from_record -> the same grids to the last bit."""
    fixed = make_passport(4)
    moving = moved_passport(fixed, rotation_matrix([1, 0, 1], 5.0), np.array([3.0, 2.0, -4.0]))
    rigid_options = RigidOptions(residual_threshold_mm=12.0, loss="huber", n_hypotheses=50,
                                 weight_table=(("bones", 2.0, ("vertebrae_*",)),))
    options = DeformableOptions(smoothing=1e4, mode="point", mutual=False, cell_mm=7.0, iterations=2,
                                min_points_per_structure=6, min_voxels=20, max_control_points=80,
                                bbox_mm=np.array([[-150.0, -120, -170], [150, 120, 170]]))
    rigid = register_rigid(fixed, moving, rigid_options)
    defo = register_deformable(fixed, moving, rigid, options)
    record = json.loads(json.dumps({"rigid": rigid.settings, "deformable": defo.settings}))
    assert RigidOptions.from_record(record["rigid"]) == rigid_options
    rebuilt = DeformableOptions.from_record(record["deformable"])
    assert rebuilt == options and asdict(rebuilt) == asdict(options)
    rigid2 = register_rigid(fixed, moving, RigidOptions.from_record(record["rigid"]))
    defo2 = register_deformable(fixed, moving, rigid2, rebuilt)
    assert np.array_equal(rigid2.matrix, rigid.matrix)
    for name in ("origin", "spacing", "fixed_to_moving", "moving_to_fixed"):
        assert np.array_equal(getattr(defo2.grid, name), getattr(defo.grid, name)), name
    # keyword settings are the same as the options object
    defo3 = register_deformable(fixed, moving, rigid, **{k: v for k, v in asdict(options).items()})
    assert np.array_equal(defo3.grid.fixed_to_moving, defo.grid.fixed_to_moving)


def test_options_resolve_defaults_and_refuse_bad_values():
    assert DeformableOptions(smoothing=123.0).centroid_smoothing == 123.0
    assert RigidOptions(residual_threshold_mm=20.0).loss_scale_mm == 10.0
    assert replace(DeformableOptions(), iterations=2).iterations == 2
    with pytest.raises(ValueError, match="mode"):
        DeformableOptions(mode="plain")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cell_mm"):
            DeformableOptions(cell_mm=bad)
    fixed = make_passport(1)
    rigid = register_rigid(fixed, fixed)
    with pytest.raises(TypeError, match="not both"):
        register_deformable(fixed, fixed, rigid, DeformableOptions(), smoothing=1.0)


def test_evaluate_passes_its_matching_flags_to_the_options():
    from registration.evaluate import build_parser, deformable_options

    assert deformable_options(build_parser().parse_args([])) == DeformableOptions()
    chosen = deformable_options(build_parser().parse_args(["--symmetric", "--no-mutual", "--iterations", "3"]))
    assert (chosen.symmetric, chosen.mutual, chosen.iterations) == (True, False, 3)
