"""common.imaging.labels and common.imaging.geometry: the one integer-label policy, the grid tolerance, voxel <-> world."""
from __future__ import annotations

import numpy as np
import pytest

from common.core.errors import InputError
from common.imaging.geometry import even_indices, fov_bbox_mm, grid_world, voxel_to_world, world_to_voxel
from common.imaging.labels import (
    GRID_ATOL_MM,
    as_label_array,
    checked_label_array,
    same_grid,
    total_class_ids,
    total_class_names,
)

AFFINE = np.array([[-0.8, 0.0, 0.1, 120.5], [0.0, 0.8, 0.0, -90.25], [0.05, 0.0, 1.5, 33.0], [0, 0, 0, 1]])


def test_label_policy_accepts_integers_bools_and_whole_floats():
    ints = np.array([[[0, 3], [7, 117]]], dtype=np.int16)
    kept = as_label_array(ints)
    assert kept.dtype == np.int16 and np.array_equal(kept, ints)
    assert as_label_array(np.array([True, False])).dtype == np.uint8
    whole = as_label_array(np.array([0.0, 2.0, 117.0]))
    assert whole.dtype == np.int32 and whole.tolist() == [0, 2, 117]
    big = as_label_array(np.array([0.0, 3e9]))  # beyond int32: kept exact, not overflowed
    assert big.dtype == np.int64 and big.tolist() == [0, 3_000_000_000]


@pytest.mark.parametrize("data,message", [
    (np.array([0.0, 1.5]), "non-integer values"),
    (np.array([0.0, np.nan]), "non-integer values"),
    (np.array(["a", "b"]), "non-integer dtype"),
    (np.array([0, -2]), "negative labels"),
])
def test_label_policy_refuses_what_is_not_a_label_map(data, message):
    with pytest.raises(ValueError, match=message):
        as_label_array(data)


def test_negative_labels_as_background_and_dimension_check(tmp_path):
    assert as_label_array(np.array([-1, 0, 4]), negative_as_background=True).tolist() == [0, 0, 4]
    assert as_label_array(np.array([-1.0, 4.0]), negative_as_background=True).tolist() == [0, 4]
    with pytest.raises(ValueError, match=r"2-D with shape \(2, 2\), expected 3-D"):
        as_label_array(np.zeros((2, 2), dtype=np.uint8), ndim=3)
    path = tmp_path / "gt.nii.gz"
    with pytest.raises(InputError) as err:
        checked_label_array(np.full((2, 2, 2), 0.5), path)
    assert str(err.value) == f"{path}: label map holds non-integer values"


def test_same_grid_uses_the_one_tolerance():
    shape = (4, 5, 6)
    assert same_grid(shape, AFFINE, shape, AFFINE + GRID_ATOL_MM / 2)
    assert not same_grid(shape, AFFINE, shape, AFFINE + GRID_ATOL_MM * 2)
    assert not same_grid(shape, AFFINE, (4, 5, 7), AFFINE)


def test_total_class_names_and_ids_agree():
    names = total_class_names()
    assert len(names) == 117 and list(names) == sorted(names)
    assert total_class_ids() == {name: idx for idx, name in names.items()}


def test_voxel_world_round_trip_and_grid_points():
    ijk = np.array([[0, 0, 0], [3, 4, 5], [1.5, 2.25, 0.5]])
    world = voxel_to_world(ijk, AFFINE)
    np.testing.assert_allclose(world, (AFFINE @ np.c_[ijk, np.ones(3)].T).T[:, :3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(world_to_voxel(world, AFFINE), ijk, rtol=0, atol=1e-12)
    shape = (3, 4, 5)
    pts = grid_world(shape, AFFINE, slice(1, 3))
    i, j, k = np.meshgrid(range(3), range(4), range(1, 3), indexing="ij")
    np.testing.assert_array_equal(pts, voxel_to_world(np.c_[i.ravel(), j.ravel(), k.ravel()], AFFINE))
    box = fov_bbox_mm(shape, AFFINE)
    every = grid_world(shape, AFFINE)
    np.testing.assert_allclose(box, [every.min(axis=0), every.max(axis=0)], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,k", [(0, 5), (3, 5), (10, 3), (1000, 7), (7, 7), (5, 0), (5, -1)])
def test_even_indices_are_distinct_increasing_and_spread(n, k):
    idx = even_indices(n, k)
    assert len(idx) == max(0, min(n, k))
    assert np.all(np.diff(idx) > 0) and (len(idx) == 0 or (idx[0] == 0 and idx[-1] < n))
    if 0 < k < n:
        assert np.diff(idx).max() - np.diff(idx).min() <= 1  # evenly spaced up to integer rounding
