"""Where the registration error sits: registration.accuracy.tre_by_structure (TRE in mm per structure).

Label maps are (x, y, z) arrays; the affine maps voxel (i, j, k) to world mm (RAS+).
"""
from __future__ import annotations

import numpy as np
import pytest

from common.imaging.geometry import voxel_to_world
from registration.accuracy import tre_by_structure
from registration.synthetic import KnownTransform


class _Scaled:
    """An estimate whose fixed -> moving error grows with x: x -> x + (0.1 x, 0, 0) (mm)."""

    def fixed_to_moving(self, x: np.ndarray) -> np.ndarray:
        return x + np.c_[0.1 * x[:, 0], np.zeros((len(x), 2))]


class _Exact:
    def fixed_to_moving(self, x: np.ndarray) -> np.ndarray:
        return x.copy()


def test_worst_structures_first_with_their_mean_error():
    labels = np.zeros((30, 4, 4), dtype=np.int32)
    labels[2:8] = 1      # near x = 0: small error
    labels[20:28] = 2    # far along x: large error
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm voxels
    pts = voxel_to_world(np.argwhere(np.ones(labels.shape, dtype=bool)), affine)
    rows = tre_by_structure(pts, labels, affine, {1: "near", 2: "far"}, KnownTransform.identity(),
                            {"rigid": _Exact(), "rigid_tps": _Scaled()}, worst=2)
    assert [r["structure"] for r in rows] == ["far", "background"]
    far_x = voxel_to_world(np.argwhere(labels == 2), affine)[:, 0]
    assert rows[0]["rigid_tps"] == pytest.approx(0.1 * far_x.mean())  # mean |0.1 x| over the structure, mm
    assert rows[0]["rigid"] == 0.0 and rows[0]["n"] == int((labels == 2).sum())
    assert tre_by_structure(np.zeros((0, 3)), labels, affine, {}, KnownTransform.identity(), {"a": _Exact()}) == []
