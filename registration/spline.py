"""Deformable tier, spline side: control cells, the thin-plate spline fits and the displacement grid.

Points and displacements are world mm (RAS+) in the FIXED frame; a displacement u(x) maps a fixed point x
to its rigidly mapped moving point x + u(x). See registration/deformable.py for the method.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.interpolate import RBFInterpolator

from registration.options import DeformableOptions
from registration.transform import DisplacementGrid


def fit_tps(points: np.ndarray, values: np.ndarray, smoothing: np.ndarray | float) -> RBFInterpolator:
    """Thin-plate spline (degree-1 polynomial) from (n, 3) points to (n, 3) values; tiny extra
    smoothing as a fallback when the exact system is singular (duplicate points)."""
    try:
        return RBFInterpolator(points, values, kernel="thin_plate_spline", smoothing=smoothing, degree=1)
    except np.linalg.LinAlgError:
        return RBFInterpolator(points, values, kernel="thin_plate_spline",
                               smoothing=np.asarray(smoothing) + 1e-6, degree=1)


_MAX_CELL_ROUNDS = 400  # 1.15 ** 400 ~ 2e24: far beyond any extent / cell_mm ratio (belt and braces)


def assign_cells(points: np.ndarray, owner: np.ndarray, budget: int, cell_mm: float) -> tuple[np.ndarray, float]:
    """Cell index per point: points of one structure in one cube of side h share a cell. h starts at
    ``cell_mm`` and grows by 15 % until there are at most ``budget`` cells. Returns (cell ids, h).

    The floor is one cell per structure: h stops growing as soon as every structure is a single cell,
    even when that is more than ``budget`` cells (the caller records that the floor was applied).
    Always terminates: non-finite coordinates fall into their structure's first cell, a
    non-positive or non-finite ``cell_mm`` and more than ``_MAX_CELL_ROUNDS`` rounds give the floor."""
    n_owners = int(np.unique(owner).size)
    if not len(points):
        return np.zeros(0, dtype=np.int64), float(cell_mm)
    finite = np.isfinite(points)
    ok_rows = finite.all(axis=1)
    lo = points[ok_rows].min(axis=0) if ok_rows.any() else np.zeros(3)
    h = float(cell_mm)
    for _ in range(_MAX_CELL_ROUNDS if np.isfinite(h) and h > 0 else 0):
        q = np.floor(np.where(finite, points - lo, 0.0) / h)
        q = np.clip(np.where(np.isfinite(q), q, 0.0), 0.0, 2.0 ** 52).astype(np.int64)  # defined casts only
        key = ((owner.astype(np.int64) * 4096 + q[:, 0]) * 4096 + q[:, 1]) * 4096 + q[:, 2]
        _, inv = np.unique(key, return_inverse=True)
        n_cells = int(inv.max()) + 1
        if n_cells <= max(budget, 1) or n_cells <= n_owners:
            return inv.ravel(), h
        h *= 1.15
    # cannot happen for finite points and a finite cell_mm > 0 (h outgrows the extent first)
    _, inv = np.unique(owner, return_inverse=True)
    return inv.ravel().astype(np.int64), h


@dataclass
class ControlCells:
    """Control cells of the surface points: ``cell`` (n,) cell id per point, ``size_mm`` the cube side used,
    ``centres`` (n_cells, 3) mean point of each cell (world mm); ``floor_applied`` when one cell per structure
    plus the centroids is more than ``max_control_points``."""

    cell: np.ndarray
    size_mm: float
    floor_applied: bool
    centres: np.ndarray

    @property
    def n_cells(self) -> int:
        """The number of cells (rows of ``centres``)."""
        return len(self.centres)


def control_cells(points: np.ndarray, owner: np.ndarray, n_centroids: int,
                  options: DeformableOptions) -> ControlCells:
    """Group the (n, 3) surface points (mm) of each structure (``owner``) into cubes, at most
    ``max_control_points`` minus ``n_centroids`` cells, never fewer than one per structure."""
    budget = max(options.max_control_points - n_centroids, 1)
    if len(points):
        cell, h = assign_cells(points, owner, budget, options.cell_mm)
    else:
        cell, h = np.zeros(0, dtype=np.int64), options.cell_mm
    n_cells = int(cell.max()) + 1 if len(cell) else 0
    # the floor: one cell per structure plus the centroids, even when max_control_points is smaller
    floor_applied = n_cells + n_centroids > options.max_control_points
    counts = np.bincount(cell, minlength=n_cells).astype(np.float64)
    centres = np.zeros((n_cells, 3))
    for d in range(3):
        centres[:, d] = np.bincount(cell, weights=points[:, d], minlength=n_cells) / np.maximum(counts, 1)
    return ControlCells(cell, h, bool(floor_applied), centres)


def initial_field(centroids: np.ndarray, displacements: np.ndarray, centres: np.ndarray,
                  smoothing: float) -> tuple[RBFInterpolator | None, np.ndarray]:
    """(spline, u at the cell ``centres``) of a TPS through the centroid ``displacements`` (n, 3) mm; with
    fewer than 5 centroids no spline (None) and the mean displacement everywhere."""
    n_cells = len(centres)
    if len(centroids) >= 5:
        tps = fit_tps(centroids, displacements, smoothing)
        return tps, tps(centres) if n_cells else np.zeros((0, 3))
    # too few centroids for a spline: constant mean displacement
    mean = displacements.mean(axis=0) if len(displacements) else np.zeros(3)
    return None, np.tile(mean, (n_cells, 1))


def grid_for(points: list[np.ndarray], margin_mm: float, grid_points: int,
             bbox_mm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Isotropic grid (origin mm, spacing mm, shape (nx, ny, nz)) of about ``grid_points`` nodes over the
    points' bounding box, the optional ``bbox_mm`` [[min x, y, z], [max x, y, z]] and ``margin_mm``."""
    allp = np.concatenate([p for p in points if len(p)])
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    if bbox_mm is not None:
        b = np.asarray(bbox_mm, dtype=np.float64).reshape(2, 3)
        lo, hi = np.minimum(lo, b[0]), np.maximum(hi, b[1])
    lo, hi = lo - margin_mm, hi + margin_mm
    ext = np.maximum(hi - lo, 1e-3)
    h = float((np.prod(ext) / max(grid_points, 8)) ** (1.0 / 3.0))
    shape = np.maximum(np.round(ext / h).astype(int) + 1, 3)
    spacing = ext / (shape - 1)
    return lo, spacing, (int(shape[0]), int(shape[1]), int(shape[2]))


def sample_smooth_field(field: Callable[[np.ndarray], np.ndarray], origin: np.ndarray, spacing: np.ndarray,
                        shape: tuple[int, int, int], step: int) -> np.ndarray:
    """(nx, ny, nz, 3) values of a smooth field (callable on (n, 3) world mm) at the nodes origin + ijk *
    spacing. ``step`` > 1: evaluated exactly on every ``step``-th node along each axis (both ends included)
    and interpolated between them with cubic B-splines (scipy.ndimage.map_coordinates, order 3), about
    step^3 times fewer evaluations of the field."""
    axes = [origin[d] + spacing[d] * np.arange(shape[d]) for d in range(3)]
    if step <= 1 or min(shape) < 4:
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        return field(pts).reshape(shape + (3,))
    counts = [max(int(np.ceil((n - 1) / step)) + 1, 4) for n in shape]
    coarse_idx = [np.linspace(0.0, n - 1.0, c) for n, c in zip(shape, counts, strict=True)]
    coarse_axes = [origin[d] + spacing[d] * coarse_idx[d] for d in range(3)]
    pts = np.stack(np.meshgrid(*coarse_axes, indexing="ij"), axis=-1).reshape(-1, 3)
    coarse = field(pts).reshape(tuple(counts) + (3,))
    # fine node i sits at fractional coarse index i * (c - 1) / (n - 1)
    fine = np.meshgrid(*[np.arange(n) * (c - 1) / (n - 1) for n, c in zip(shape, counts, strict=True)],
                       indexing="ij")
    coords = np.stack([f.ravel() for f in fine])
    out = np.stack([ndimage.map_coordinates(coarse[..., k], coords, order=3, mode="nearest") for k in range(3)],
                   axis=-1)
    return out.reshape(shape + (3,))


def displacement_grid(tps: Callable[[np.ndarray], np.ndarray] | None, clouds: list[np.ndarray],
                      displacements: np.ndarray, options: DeformableOptions) -> DisplacementGrid:
    """The spline's u sampled on the grid over ``clouds`` (``grid_for``; exactly on every
    ``grid_eval_step``-th node, cubic in between: ``sample_smooth_field``); without a spline the mean centroid
    displacement (or 0). The inverse (``moving_to_fixed``) is left to transform.invert_displacement."""
    origin, spacing, shape = grid_for(clouds, options.margin_mm, options.grid_points, options.bbox_mm)
    grid = DisplacementGrid(origin, spacing, np.zeros(shape + (3,)))
    if tps is not None:
        grid.fixed_to_moving = sample_smooth_field(tps, origin, spacing, shape, options.grid_eval_step)
    elif len(displacements):
        grid.fixed_to_moving[...] = displacements.mean(axis=0)
    return grid
