"""Voxel grids in world space: one home for voxel <-> world mapping, field-of-view boxes and even subsampling.

Conventions (as nibabel): voxel indices are (i, j, k) = (x, y, z) array axes; world points are RAS+ mm; an
affine is the 4x4 matrix that maps a voxel centre's (i, j, k, 1) to its world (x, y, z, 1).
"""
from __future__ import annotations

import numpy as np


def voxel_to_world(points_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (n, 3) voxel coordinates (i, j, k; fractional allowed) to (n, 3) world mm through a 4x4 affine."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(points_vox, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(points_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (n, 3) world mm points to (n, 3) fractional voxel coordinates (i, j, k) of ``affine``."""
    return voxel_to_world(points_mm, np.linalg.inv(np.asarray(affine, dtype=np.float64)))


def grid_world(shape: tuple[int, ...], affine: np.ndarray, k_slice: slice = slice(None)) -> np.ndarray:
    """(n, 3) world mm of the voxel centres of an (x, y, z) grid ``shape`` with k in ``k_slice``, C order
    over (i, j, k)."""
    i, j, k = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(shape[2])[k_slice], indexing="ij")
    return voxel_to_world(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1), affine)


def fov_bbox_mm(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """(2, 3) [[min x, y, z], [max x, y, z]] world mm of the bounding box of a grid's voxel centres (its 8
    corner voxels)."""
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = voxel_to_world(corners, affine)
    return np.stack([world.min(axis=0), world.max(axis=0)])


def even_indices(n: int, k: int) -> np.ndarray:
    """At most ``k`` evenly spaced, distinct, increasing indices into range(n) (deterministic; none when k <= 0)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return (np.arange(k, dtype=np.int64) * n) // k
