"""Tier 2: deformable registration of two passports with a regularised thin-plate spline.

Works after the rigid tier, in the FIXED world frame (mm, RAS+). Moving boundary points are first
mapped by the rigid transform (p = R y + t); the spline models the remaining displacement

    u(x) = p - x   (fixed point x  ->  rigidly mapped moving point p),

i.e. the FIXED -> MOVING direction needed to pull moving images onto the fixed grid. The inverse
(MOVING -> FIXED) is computed numerically on the same grid (transform.invert_displacement).

Correspondences (per structure, matched by name, never across structures):
1. surface points: the fixed boundary points (<= ``max_points_per_structure`` each and about
   ``max_surface_points`` in all, evenly subsampled), each with a surface normal (PCA of its
   neighbours) and moved along that normal onto the local mean surface of its
   ``surface_neighbours`` neighbours (averages out the 3 mm voxel staircase);
2. cells: the points of a structure are grouped into cubes (``cell_mm``, enlarged until there are at
   most ``max_control_points`` cells + centroids); each cell is one TPS control point at its mean;
3. initial field: a TPS through the centroid displacements (averaged over each structure);
4. ``iterations`` rounds of ICP with TPS regularisation: predict every surface point's moving
   position with the current field (value at its cell), find its nearest rigidly mapped moving
   boundary points of the same structure (only MUTUAL nearest neighbours by default), compare the
   local mean moving surface with the local mean fixed surface ALONG THE FIXED NORMAL
   (point-to-plane: no sliding along surfaces), reject corrections above
   max(``outlier_floor_mm``, ``outlier_factor`` x median), and solve per cell the least-squares
   correction vector from its points' normal constraints (damped: no correction along directions
   no normal constrains). The TPS (scipy RBFInterpolator, thin_plate_spline) is refitted on the cells
   (smoothing ``smoothing`` / matches in the cell) plus the centroids.

Measured on the real CT with known transforms (registration/evaluate.py): raw nearest-neighbour
point matches with little smoothing made the dense error WORSE than rigid alone; point-to-plane,
local surface means, cells and strong smoothing are what make the spline help (see the report in
benchmarks/registration_eval.json).

The final spline is evaluated on a coarse regular grid (about ``grid_points`` nodes over the union of
the two point clouds, the optional ``bbox_mm`` and ``margin_mm``) and interpolated trilinearly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.interpolate import RBFInterpolator
from scipy.spatial import cKDTree

from registration.rigid import RigidResult
from registration.structures import (
    PassportLike,
    boundary_points,
    centroid,
    even_indices,
    matched_names,
    structure_table,
)
from registration.transform import DisplacementGrid, Transform, invert_displacement


@dataclass
class DeformableResult:
    """Displacement grid (fixed frame, mm) plus diagnostics. Times in milliseconds."""

    grid: DisplacementGrid
    n_control_points: int
    n_centroids: int
    structures_used: list[str]
    structures_excluded: list[str]
    history: list[dict[str, Any]]
    time_ms: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def jacobian_stats(self) -> dict[str, float]:
        return jacobian_stats(self.grid)

    def to_dict(self) -> dict[str, Any]:
        g = self.grid
        u = np.linalg.norm(g.fixed_to_moving, axis=-1)
        return {
            "direction": "u on a grid in the fixed frame: fixed x -> rigid-frame x + u(x); inverse stored too",
            "n_control_points": int(self.n_control_points),
            "n_centroids": int(self.n_centroids),
            "n_structures_used": len(self.structures_used),
            "structures_excluded": list(self.structures_excluded),
            "grid_shape": list(g.shape),
            "grid_spacing_mm": g.spacing.tolist(),
            "grid_origin_mm": g.origin.tolist(),
            "displacement_mm_max": float(u.max()) if u.size else 0.0,
            "displacement_mm_mean": float(u.mean()) if u.size else 0.0,
            "jacobian": jacobian_stats(g),
            "history": self.history,
            "time_ms": {k: float(v) for k, v in self.time_ms.items()},
            "settings": dict(self.settings),
        }


def jacobian_stats(grid: DisplacementGrid) -> dict[str, float]:
    """Folding of the fixed->moving map x -> x + u(x) on the grid nodes.

    Returns the fraction of nodes with det(J) <= 0, min det(J), and the standard deviation of
    log det(J) over the nodes with det(J) > 0.
    """
    det = grid.jacobian_determinant()
    pos = det[det > 0]
    return {
        "fraction_nonpositive": float(np.mean(det <= 0)),
        "det_min": float(det.min()),
        "log_det_std": float(np.std(np.log(pos))) if pos.size else float("nan"),
    }


def _fit_tps(points: np.ndarray, values: np.ndarray, smoothing: np.ndarray | float) -> RBFInterpolator:
    """Thin-plate spline (degree-1 polynomial) from (n, 3) points to (n, 3) values; tiny extra
    smoothing as a fallback when the exact system is singular (duplicate points)."""
    try:
        return RBFInterpolator(points, values, kernel="thin_plate_spline", smoothing=smoothing, degree=1)
    except np.linalg.LinAlgError:
        return RBFInterpolator(points, values, kernel="thin_plate_spline",
                               smoothing=np.asarray(smoothing) + 1e-6, degree=1)


_SEPARATION_MM = 1.0e7  # distance between structures in the 4-D search space (far beyond any anatomy)


def _with_owner(points: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """(n, 4) search coordinates: the point (mm) plus its structure index x _SEPARATION_MM."""
    return np.concatenate([points, owner[:, None].astype(np.float64) * _SEPARATION_MM], axis=1)


def _knn_same_owner(tree: cKDTree, points: np.ndarray, owner: np.ndarray, k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each (n, k), of the k nearest tree points of the SAME structure;
    index -1 and distance inf where the structure has fewer points."""
    k = int(min(k, tree.n))
    dist, idx = tree.query(_with_owner(points, owner), k=k, distance_upper_bound=_SEPARATION_MM / 2)
    idx = np.asarray(idx).reshape(len(points), k)
    dist = np.asarray(dist, dtype=np.float64).reshape(len(points), k)
    return dist, np.where(idx >= tree.n, -1, idx)


def _local_mean(cloud: np.ndarray, idx: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Weighted mean of each row's neighbours cloud[idx], weights (1 - (d / d_last)^2)^2.

    The weight falls to zero at the farthest neighbour, so which of several equidistant points
    (common on voxel grids) the k-nearest search returned last does not matter: the mean is a
    continuous function of the points and identical point sets give identical means."""
    valid = idx >= 0
    d = np.where(valid, dist, 0.0)
    d_last = d.max(axis=1, keepdims=True)
    w = np.where(valid, (1.0 - (d / np.maximum(d_last, 1e-12)) ** 2) ** 2, 0.0)
    flat = w.sum(axis=1) <= 1e-12  # all neighbours equidistant: plain mean
    w[flat] = valid[flat]
    pts = cloud[np.maximum(idx, 0)]
    return (pts * w[..., None]).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-12)[:, None]


def _pca_normals(points: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Unit surface normals: smallest principal axis of each point's first k valid neighbours."""
    idx = idx[:, :k]
    valid = (idx >= 0)[..., None]
    nb = points[np.maximum(idx, 0)]
    n_valid = np.maximum(valid.sum(axis=1), 1)
    mean = (nb * valid).sum(axis=1) / n_valid
    diff = (nb - mean[:, None]) * valid
    cov = np.einsum("nki,nkj->nij", diff, diff)
    _, vecs = np.linalg.eigh(cov)
    normals = vecs[:, :, 0]
    normals[valid.sum(axis=1)[:, 0] < 3] = 0.0  # too few neighbours: no normal, no constraint
    return normals


def _inconsistent_centroids(cf: np.ndarray, cm: np.ndarray, smoothing: float, threshold_mm: float,
                            folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Flag centroids whose displacement (cm - cf, mm) the others do not predict within ``threshold_mm``.

    Pass 1: ``folds``-fold cross-validated centroid TPS (deterministic folds i % folds). Pass 2: the
    flagged ones are predicted again from the unflagged ones only (so one gross outlier does not
    condemn its neighbours). Returns (flags, prediction errors in mm). Needs >= 8 centroids.
    """
    n = len(cf)
    flags = np.zeros(n, dtype=bool)
    err = np.zeros(n)
    if n < 8 or threshold_mm <= 0:
        return flags, err
    d = cm - cf
    fold = np.arange(n) % folds
    for f in range(folds):
        test = fold == f
        tps = _fit_tps(cf[~test], d[~test], smoothing)
        err[test] = np.linalg.norm(tps(cf[test]) - d[test], axis=1)
    flags = err > threshold_mm
    if flags.any() and (~flags).sum() >= 5:
        tps = _fit_tps(cf[~flags], d[~flags], smoothing)
        err[flags] = np.linalg.norm(tps(cf[flags]) - d[flags], axis=1)
        flags = err > threshold_mm
    return flags, err


_MAX_CELL_ROUNDS = 400  # 1.15 ** 400 ~ 2e24: far beyond any extent / cell_mm ratio (belt and braces)


def _cells(points: np.ndarray, owner: np.ndarray, budget: int, cell_mm: float) -> tuple[np.ndarray, float]:
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


def _grid_for(points: list[np.ndarray], margin_mm: float, grid_points: int,
              bbox_mm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Isotropic grid (origin, spacing, shape) of about ``grid_points`` nodes over the points' bounding box."""
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


def register_deformable(fixed: PassportLike, moving: PassportLike, rigid: RigidResult, *,
                        smoothing: float = 3e4,
                        centroid_smoothing: float | None = None,
                        max_control_points: int = 1000,
                        cell_mm: float = 10.0,
                        max_points_per_structure: int = 500,
                        max_surface_points: int = 20000,
                        min_points_per_structure: int = 4,
                        iterations: int = 4,
                        mode: str = "plane",
                        mutual: bool = True,
                        normal_neighbours: int = 12,
                        surface_neighbours: int = 8,
                        normal_damping: float = 0.1,
                        outlier_factor: float = 3.0,
                        outlier_floor_mm: float = 5.0,
                        max_structure_residual_mm: float = 60.0,
                        consistency_mm: float = 20.0,
                        exclude_rigid_outliers: bool = False,
                        grid_points: int = 24 ** 3,
                        margin_mm: float = 20.0,
                        bbox_mm: np.ndarray | None = None,
                        min_voxels: int = 8) -> DeformableResult:
    """Fit the deformable tier after ``rigid`` (see the module docstring); returns a DeformableResult.

    ``smoothing``: RBFInterpolator smoothing of a control point backed by one surface match (a cell
    with n matches gets smoothing / n); centroids use ``centroid_smoothing`` (default: ``smoothing``).
    ``mode``: "plane" (point-to-plane corrections solved per cell) or "point" (mean nearest-point
    correction per cell). ``cell_mm``: initial cell size; cells grow until there are at most
    ``max_control_points`` minus the number of centroids. Structures that are rigid outliers (with
    ``exclude_rigid_outliers``; by default they are kept, a large local deformation is not an error),
    whose centroid residual after the rigid step exceeds ``max_structure_residual_mm``, or whose
    centroid displacement differs by more than ``consistency_mm`` from the one predicted by the other
    structures (5-fold cross-validated centroid TPS: a mislabelled structure) are not used.
    ``bbox_mm``: optional [[xmin, ymin, zmin], [xmax, ymax, zmax]] (fixed world mm) the grid must also
    cover, e.g. the fixed scan's extent.
    """
    if mode not in ("plane", "point"):
        raise ValueError(f"mode must be 'plane' or 'point', got {mode!r}")
    if not (np.isfinite(cell_mm) and cell_mm > 0):
        raise ValueError(f"cell_mm must be a finite number > 0, got {cell_mm!r}")
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    t0 = t_all
    fixed_t = structure_table(fixed, min_voxels)
    moving_t = structure_table(moving, min_voxels)
    names = matched_names(fixed_t, moving_t)
    rigid_out = set(rigid.outliers) if exclude_rigid_outliers else set()
    c_smooth = float(smoothing) if centroid_smoothing is None else float(centroid_smoothing)
    candidates = []
    for n in names:
        c_f = centroid(fixed_t[n])
        c_m = rigid.apply(centroid(moving_t[n])[None])[0]
        if n not in rigid_out and np.linalg.norm(c_m - c_f) <= max_structure_residual_mm:
            candidates.append((n, c_f, c_m))
    # a structure whose centroid displacement disagrees with what its neighbours predict is
    # mislabelled (or badly segmented) in one scan, not deformed: leave it out of the spline
    inconsistent, consistency_err = _inconsistent_centroids(
        np.array([c[1] for c in candidates]).reshape(-1, 3), np.array([c[2] for c in candidates]).reshape(-1, 3),
        c_smooth, consistency_mm)
    used: list[str] = []
    excluded = [n for n in names if n not in {c[0] for c in candidates}]
    F: list[np.ndarray] = []
    M: list[np.ndarray] = []
    cf, cm = [], []
    per_structure = max_points_per_structure
    if names and max_surface_points:
        per_structure = max(min(max_points_per_structure, max_surface_points // len(names)), min_points_per_structure)
    for (n, c_f, c_m), bad in zip(candidates, inconsistent, strict=True):
        if bad:
            excluded.append(n)
            continue
        used.append(n)
        cf.append(c_f)
        cm.append(c_m)
        pf, pm = boundary_points(fixed_t[n]), boundary_points(moving_t[n])
        F.append(pf[even_indices(len(pf), per_structure)])
        M.append(rigid.apply(pm[even_indices(len(pm), per_structure)]) if len(pm) else np.zeros((0, 3)))
    cf_a = np.array(cf).reshape(-1, 3)
    cm_a = np.array(cm).reshape(-1, 3)
    d_c = cm_a - cf_a

    # --- surface points, normals and cells ------------------------------------------------------
    # All structures are searched at once: a 4th coordinate (structure index x _SEPARATION_MM) keeps
    # every nearest-neighbour query inside its own structure.
    ok = [i for i in range(len(used)) if len(F[i]) >= min_points_per_structure and len(M[i]) >= min_points_per_structure]
    pts = np.concatenate([F[i] for i in ok]) if ok else np.zeros((0, 3))
    owner = np.concatenate([np.full(len(F[i]), i) for i in ok]) if ok else np.zeros(0, dtype=np.int64)
    mpts = np.concatenate([M[i] for i in ok]) if ok else np.zeros((0, 3))
    m_owner = np.concatenate([np.full(len(M[i]), i) for i in ok]) if ok else np.zeros(0, dtype=np.int64)
    tree_m = cKDTree(_with_owner(mpts, m_owner)) if len(mpts) else None
    normals = np.zeros_like(pts)
    smooth_pts = pts.copy()
    # one neighbour count for the fixed and the moving queries: identical point sets then give
    # identical neighbourhoods even where distances tie (voxel grids), so self-registration is exact
    k_query = max(normal_neighbours, surface_neighbours, 3)
    if mode == "plane" and len(pts):
        nb_d, nb = _knn_same_owner(cKDTree(_with_owner(pts, owner)), pts, owner, k_query)
        normals = _pca_normals(pts, nb, normal_neighbours)
        if surface_neighbours > 1:  # move each fixed point onto the local mean surface (along its normal)
            mean_nb = _local_mean(pts, nb[:, :surface_neighbours], nb_d[:, :surface_neighbours])
            off = np.einsum("ij,ij->i", mean_nb - pts, normals)
            smooth_pts = pts + normals * off[:, None]
    budget = max(max_control_points - len(cf_a), 1)
    cell, h = _cells(pts, owner, budget, cell_mm) if len(pts) else (np.zeros(0, dtype=np.int64), cell_mm)
    n_cells = int(cell.max()) + 1 if len(cell) else 0
    # the floor: one cell per structure plus the centroids, even when max_control_points is smaller
    floor_applied = n_cells + len(cf_a) > max_control_points
    counts = np.bincount(cell, minlength=n_cells).astype(np.float64)
    centres = np.zeros((n_cells, 3))
    for d in range(3):
        centres[:, d] = np.bincount(cell, weights=pts[:, d], minlength=n_cells) / np.maximum(counts, 1)
    times["prepare"] = (time.perf_counter() - t0) * 1000.0

    # --- initial field: TPS through the centroid displacements --------------------------------
    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    if len(cf_a) >= 5:
        tps = _fit_tps(cf_a, d_c, c_smooth)
        u_cell = tps(centres) if n_cells else np.zeros((0, 3))
    else:  # too few centroids for a spline: constant mean displacement
        tps = None
        u_cell = np.tile(d_c.mean(axis=0) if len(d_c) else np.zeros(3), (n_cells, 1))
    times["init"] = (time.perf_counter() - t0) * 1000.0
    history.append({"step": "centroids", "n_points": int(len(cf_a)),
                    "centroid_disp_mm_mean": float(np.linalg.norm(d_c, axis=1).mean()) if len(d_c) else 0.0,
                    "consistency_err_mm_max_used": float(consistency_err[~inconsistent].max())
                    if (~inconsistent).any() else 0.0,
                    "inconsistent": {c[0]: float(e) for c, e, b in zip(candidates, consistency_err, inconsistent,
                                                                        strict=True) if b}})

    # --- ICP rounds with TPS regularisation ----------------------------------------------------
    t_match = t_fit = 0.0
    n_used_cells = 0
    for it in range(iterations if n_cells else 0):
        t0 = time.perf_counter()
        fhat = pts + u_cell[cell]  # piecewise-constant prediction per cell
        if mode == "plane" and surface_neighbours > 1:
            dk, nbk = _knn_same_owner(tree_m, fhat, owner, k_query)
            nn = nbk[:, 0]
            # local mean moving surface vs local mean fixed surface (compared along the fixed normal)
            delta = _local_mean(mpts, nbk[:, :surface_neighbours], dk[:, :surface_neighbours]) - (
                smooth_pts + u_cell[cell])
        else:
            nn = _knn_same_owner(tree_m, fhat, owner, 1)[1][:, 0]
            delta = mpts[np.maximum(nn, 0)] - fhat
        keep = nn >= 0
        if mutual:
            back = _knn_same_owner(cKDTree(_with_owner(fhat, owner)), mpts[np.maximum(nn, 0)], owner, 1)[1][:, 0]
            keep &= back == np.arange(len(fhat))
        if mode == "plane":
            r = np.einsum("ij,ij->i", delta, normals)
            dist = np.abs(r)
        else:
            dist = np.linalg.norm(delta, axis=1)
        if keep.any():
            thr = max(outlier_floor_mm, outlier_factor * float(np.median(dist[keep])))
            keep &= dist <= thr
        w = keep.astype(np.float64)
        n_acc = np.bincount(cell, weights=w, minlength=n_cells)
        good = n_acc > 0
        corr = np.zeros((n_cells, 3))
        if mode == "plane":
            # per cell: argmin_d sum_i (n_i . d - r_i)^2 + damping * n |d|^2 (no correction along
            # directions no normal constrains: the current field stays there)
            A = np.zeros((n_cells, 3, 3))
            b = np.zeros((n_cells, 3))
            for p in range(3):
                b[:, p] = np.bincount(cell, weights=w * r * normals[:, p], minlength=n_cells)
                for q in range(3):
                    A[:, p, q] = np.bincount(cell, weights=w * normals[:, p] * normals[:, q], minlength=n_cells)
            A += normal_damping * np.maximum(n_acc, 1)[:, None, None] * np.eye(3)
            corr[good] = np.linalg.solve(A[good], b[good][..., None])[..., 0]
        else:
            for p in range(3):
                corr[:, p] = np.bincount(cell, weights=w * delta[:, p], minlength=n_cells) / np.maximum(n_acc, 1)
        t_match += time.perf_counter() - t0
        t0 = time.perf_counter()
        ctrl = np.concatenate([centres[good], cf_a])
        vals = np.concatenate([u_cell[good] + corr[good], d_c])
        smooth = np.concatenate([float(smoothing) / n_acc[good], np.full(len(cf_a), c_smooth)])
        if len(ctrl) >= 5:
            tps = _fit_tps(ctrl, vals, smooth)
            u_new = tps(centres)
        else:
            u_new = u_cell
        t_fit += time.perf_counter() - t0
        history.append({
            "step": f"icp{it + 1}", "n_matches": int(keep.sum()), "n_cells": int(good.sum()),
            "correction_mm_mean": float(np.linalg.norm(corr[good], axis=1).mean()) if good.any() else 0.0,
            "field_change_mm_max": float(np.abs(u_new - u_cell).max()) if len(u_new) else 0.0,
        })
        u_cell = u_new
        n_used_cells = int(good.sum())
    times["match"] = t_match * 1000.0
    times["fit"] = t_fit * 1000.0

    # --- evaluate on the coarse grid, invert --------------------------------------------------
    t0 = time.perf_counter()
    origin, spacing, shape = _grid_for([*F, *M, cf_a, cm_a], margin_mm, grid_points, bbox_mm)
    grid = DisplacementGrid(origin, spacing, np.zeros(shape + (3,)))
    if tps is not None:
        grid.fixed_to_moving = tps(grid.nodes_mm()).reshape(shape + (3,))
    elif len(d_c):
        grid.fixed_to_moving[...] = d_c.mean(axis=0)
    times["grid"] = (time.perf_counter() - t0) * 1000.0
    t0 = time.perf_counter()
    grid.moving_to_fixed = invert_displacement(grid)
    times["inverse"] = (time.perf_counter() - t0) * 1000.0
    times["total"] = (time.perf_counter() - t_all) * 1000.0
    return DeformableResult(
        grid=grid,
        n_control_points=n_used_cells + len(cf_a),
        n_centroids=len(cf_a),
        structures_used=used,
        structures_excluded=excluded,
        history=history,
        time_ms=times,
        settings={
            "smoothing": smoothing, "centroid_smoothing": c_smooth, "max_control_points": max_control_points,
            "cell_mm": cell_mm, "cell_mm_used": h,
            "n_cells": n_cells, "max_control_points_effective": n_cells + len(cf_a),
            "budget_floor_applied": bool(floor_applied),
            "budget_note": (f"max_control_points {max_control_points} is below the floor of one control point per "
                            f"structure plus centroids: {n_cells} cells + {len(cf_a)} centroids used")
            if floor_applied else None,
            "max_points_per_structure": max_points_per_structure,
            "max_surface_points": max_surface_points,
            "iterations": iterations, "mode": mode, "mutual": mutual, "normal_neighbours": normal_neighbours,
            "surface_neighbours": surface_neighbours, "normal_damping": normal_damping, "outlier_factor": outlier_factor,
            "outlier_floor_mm": outlier_floor_mm, "max_structure_residual_mm": max_structure_residual_mm,
            "consistency_mm": consistency_mm, "exclude_rigid_outliers": exclude_rigid_outliers, "grid_points": grid_points, "margin_mm": margin_mm,
        },
    )


def to_transform(rigid: RigidResult, deformable: DeformableResult | None = None,
                 meta: dict[str, Any] | None = None) -> Transform:
    """Combine the tiers into a Transform (rigid MOVING->FIXED + fixed-frame displacement grid)."""
    return Transform(rigid.rotation.copy(), rigid.translation.copy(),
                     None if deformable is None else deformable.grid, dict(meta or {}))
