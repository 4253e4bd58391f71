"""Deformable tier, point side: which structures and points the spline uses, and one ICP matching round.

All points are world mm (RAS+) in the FIXED frame; moving points are first mapped by the rigid transform.
Correspondences never cross structures: nearest-neighbour searches run in a 4-D space whose 4th coordinate
is the structure index x ``_SEPARATION_MM``. See registration/deformable.py for the method.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from common.imaging.geometry import even_indices
from registration.options import DeformableOptions
from registration.rigid import RigidResult
from registration.spline import fit_tps
from registration.structures import Structures, boundary_points, centroid, matched_names, structure_table

_SEPARATION_MM = 1.0e7  # distance between structures in the 4-D search space (far beyond any anatomy)


def _with_owner(points: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """(n, 4) search coordinates: the point (mm) plus its structure index x _SEPARATION_MM."""
    return np.concatenate([points, owner[:, None].astype(np.float64) * _SEPARATION_MM], axis=1)


def _knn_same_owner(tree: cKDTree, points: np.ndarray, owner: np.ndarray, k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each (n, k), of the k nearest tree points of the SAME structure;
    index -1 and distance inf where the structure has fewer points."""
    k = int(min(k, tree.n))
    dist, idx = tree.query(_with_owner(points, owner), k=k, distance_upper_bound=_SEPARATION_MM / 2, workers=-1)
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


def inconsistent_centroids(cf: np.ndarray, cm: np.ndarray, smoothing: float, threshold_mm: float,
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
        tps = fit_tps(cf[~test], d[~test], smoothing)
        err[test] = np.linalg.norm(tps(cf[test]) - d[test], axis=1)
    flags = err > threshold_mm
    if flags.any() and (~flags).sum() >= 5:
        tps = fit_tps(cf[~flags], d[~flags], smoothing)
        err[flags] = np.linalg.norm(tps(cf[flags]) - d[flags], axis=1)
        flags = err > threshold_mm
    return flags, err


@dataclass
class StructureSelection:
    """Structures matched by name and what the spline takes from each (world mm, fixed frame).

    ``candidates``: names that passed the rigid-outlier and residual tests, with ``inconsistent`` (flags) and
    ``consistency_err_mm`` (centroid cross-validation errors) in the same order. ``fixed_points`` /
    ``moving_points``: per used structure, its subsampled boundary points (moving ones rigidly mapped).
    ``fixed_centroids`` / ``moving_centroids``: (n_used, 3), the moving ones rigidly mapped.
    """

    candidates: list[str]
    inconsistent: np.ndarray
    consistency_err_mm: np.ndarray
    used: list[str]
    excluded: list[str]
    fixed_points: list[np.ndarray]
    moving_points: list[np.ndarray]
    fixed_centroids: np.ndarray
    moving_centroids: np.ndarray


def select_structures(fixed: Structures, moving: Structures, rigid: RigidResult,
                      options: DeformableOptions) -> StructureSelection:
    """Matched structures the spline may use and their points: drops rigid outliers (with
    ``exclude_rigid_outliers``), centroid residuals above ``max_structure_residual_mm`` and centroid
    displacements the other structures do not predict within ``consistency_mm``; subsamples boundary points
    evenly (<= ``max_points_per_structure`` each, about ``max_surface_points`` in all)."""
    o = options
    fixed_t = structure_table(fixed, o.min_voxels)
    moving_t = structure_table(moving, o.min_voxels)
    names = matched_names(fixed_t, moving_t)
    rigid_out = set(rigid.outliers) if o.exclude_rigid_outliers else set()
    candidates = []
    for n in names:
        c_f = centroid(fixed_t[n])
        c_m = rigid.apply(centroid(moving_t[n])[None])[0]
        if n not in rigid_out and np.linalg.norm(c_m - c_f) <= o.max_structure_residual_mm:
            candidates.append((n, c_f, c_m))
    # a structure whose centroid displacement disagrees with what its neighbours predict is
    # mislabelled (or badly segmented) in one scan, not deformed: leave it out of the spline
    inconsistent, consistency_err = inconsistent_centroids(
        np.array([c[1] for c in candidates]).reshape(-1, 3), np.array([c[2] for c in candidates]).reshape(-1, 3),
        o.centroid_smoothing, o.consistency_mm)
    used: list[str] = []
    excluded = [n for n in names if n not in {c[0] for c in candidates}]
    F: list[np.ndarray] = []
    M: list[np.ndarray] = []
    cf, cm = [], []
    per_structure = o.max_points_per_structure
    if names and o.max_surface_points:
        per_structure = max(min(o.max_points_per_structure, o.max_surface_points // len(names)),
                            o.min_points_per_structure)
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
    return StructureSelection([c[0] for c in candidates], inconsistent, consistency_err, used, excluded,
                              F, M, np.array(cf).reshape(-1, 3), np.array(cm).reshape(-1, 3))


@dataclass
class SurfacePoints:
    """The matched point clouds (world mm, fixed frame) of the structures with enough points.

    ``points`` (n, 3) fixed boundary points, ``owner`` (n,) their structure index; ``moving_points`` /
    ``moving_owner`` likewise (rigidly mapped); ``normals`` (n, 3) unit PCA normals (0 where undefined,
    all 0 in "point" mode); ``smoothed``: ``points`` moved along the normal onto the local mean surface;
    ``k_query``: neighbour count of the local-mean searches (the same for both clouds); ``moving_normals``
    (m, 3) unit PCA normals of the moving cloud ("plane" mode with ``symmetric``, else None).
    """

    points: np.ndarray
    owner: np.ndarray
    moving_points: np.ndarray
    moving_owner: np.ndarray
    moving_tree: cKDTree | None
    normals: np.ndarray
    smoothed: np.ndarray
    k_query: int
    moving_normals: np.ndarray | None = None


def surface_points(selection: StructureSelection, options: DeformableOptions) -> SurfacePoints:
    """Stack the structures with >= ``min_points_per_structure`` points on both sides; normals and the local
    mean surface ("plane" mode)."""
    o = options
    F, M = selection.fixed_points, selection.moving_points
    ok = [i for i in range(len(selection.used))
          if len(F[i]) >= o.min_points_per_structure and len(M[i]) >= o.min_points_per_structure]
    pts = np.concatenate([F[i] for i in ok]) if ok else np.zeros((0, 3))
    owner = np.concatenate([np.full(len(F[i]), i) for i in ok]) if ok else np.zeros(0, dtype=np.int64)
    mpts = np.concatenate([M[i] for i in ok]) if ok else np.zeros((0, 3))
    m_owner = np.concatenate([np.full(len(M[i]), i) for i in ok]) if ok else np.zeros(0, dtype=np.int64)
    tree_m = cKDTree(_with_owner(mpts, m_owner)) if len(mpts) else None
    normals = np.zeros_like(pts)
    smooth_pts = pts.copy()
    # one neighbour count for the fixed and the moving local-mean queries: identical point sets then give
    # identical neighbourhoods even where distances tie (voxel grids), so self-registration is exact
    k_query = max(o.surface_neighbours, 1)
    if o.mode == "plane" and len(pts):
        tree_f = cKDTree(_with_owner(pts, owner))
        k_normals = max(o.normal_neighbours, 3)
        nb_d, nb = _knn_same_owner(tree_f, pts, owner, k_normals)
        normals = _pca_normals(pts, nb, o.normal_neighbours)
        if o.surface_neighbours > 1:  # move each fixed point onto the local mean surface (along its normal)
            if k_query != k_normals:
                nb_d, nb = _knn_same_owner(tree_f, pts, owner, k_query)
            mean_nb = _local_mean(pts, nb[:, :o.surface_neighbours], nb_d[:, :o.surface_neighbours])
            off = np.einsum("ij,ij->i", mean_nb - pts, normals)
            smooth_pts = pts + normals * off[:, None]
    m_normals = None
    if o.mode == "plane" and o.symmetric and len(mpts):
        m_normals = _pca_normals(mpts, _knn_same_owner(tree_m, mpts, m_owner, max(o.normal_neighbours, 3))[1],
                                 o.normal_neighbours)
    return SurfacePoints(pts, owner, mpts, m_owner, tree_m, normals, smooth_pts, k_query, m_normals)


def symmetric_normals(fixed_normals: np.ndarray, moving_normals: np.ndarray) -> np.ndarray:
    """Unit normals of the symmetric point-to-plane objective (Rusinkiewicz 2019, "A symmetric objective function
    for ICP"): n_f + n_m with n_m's sign turned to agree with n_f, normalised. On two locally spherical patches
    the residual along it vanishes only where the points correspond, so curvature says something about sliding
    along the surface, which the fixed normal alone cannot. Rows where either normal is 0 keep the fixed one."""
    sign = np.where(np.einsum("ij,ij->i", fixed_normals, moving_normals) < 0, -1.0, 1.0)
    n = fixed_normals + sign[:, None] * moving_normals
    norm = np.linalg.norm(n, axis=1)
    ok = (norm > 1e-9) & np.any(fixed_normals != 0, axis=1) & np.any(moving_normals != 0, axis=1)
    return np.where(ok[:, None], n / np.where(ok, norm, 1.0)[:, None], fixed_normals)


@dataclass
class Corrections:
    """One ICP round: per cell the correction (n_cells, 3) mm of the field, ``good`` cells with accepted
    matches, ``n_accepted`` matches per cell, ``n_matches`` in all; ``A`` (n_cells, 3, 3), ``b`` (n_cells, 3) mm
    and ``r2`` (n_cells,) mm^2: the undamped normal equations of the accepted matches (sum n n^T, sum r n and
    sum r^2 with point-to-plane residuals r along the unit normals n; "point" mode: count x I, sum of the
    residual vectors, sum of their squared lengths), linearised at the field the round started from."""

    correction: np.ndarray
    good: np.ndarray
    n_accepted: np.ndarray
    n_matches: int
    A: np.ndarray
    b: np.ndarray
    r2: np.ndarray


def match_step(surface: SurfacePoints, cell: np.ndarray, n_cells: int, u_cell: np.ndarray,
               options: DeformableOptions) -> Corrections:
    """Match every fixed surface point, predicted by the current per-cell field ``u_cell`` (n_cells, 3) mm, to
    the moving surface of its structure and solve each cell's correction (point-to-plane in "plane" mode)."""
    o = options
    pts, owner, mpts, normals = surface.points, surface.owner, surface.moving_points, surface.normals
    fhat = pts + u_cell[cell]  # piecewise-constant prediction per cell
    if o.mode == "plane" and o.surface_neighbours > 1:
        dk, nbk = _knn_same_owner(surface.moving_tree, fhat, owner, surface.k_query)
        nn = nbk[:, 0]
        # local mean moving surface vs local mean fixed surface (compared along the fixed normal)
        delta = _local_mean(mpts, nbk[:, :o.surface_neighbours], dk[:, :o.surface_neighbours]) - (
            surface.smoothed + u_cell[cell])
    else:
        nn = _knn_same_owner(surface.moving_tree, fhat, owner, 1)[1][:, 0]
        delta = mpts[np.maximum(nn, 0)] - fhat
    keep = nn >= 0
    if o.mutual:
        back = _knn_same_owner(cKDTree(_with_owner(fhat, owner)), mpts[np.maximum(nn, 0)], owner, 1)[1][:, 0]
        keep &= back == np.arange(len(fhat))
    if o.mode == "plane":
        if surface.moving_normals is not None:
            normals = symmetric_normals(normals, surface.moving_normals[np.maximum(nn, 0)])
        r = np.einsum("ij,ij->i", delta, normals)
        dist = np.abs(r)
    else:
        dist = np.linalg.norm(delta, axis=1)
    if keep.any():
        thr = max(o.outlier_floor_mm, o.outlier_factor * float(np.median(dist[keep])))
        keep &= dist <= thr
    w = keep.astype(np.float64)
    n_acc = np.bincount(cell, weights=w, minlength=n_cells)
    good = n_acc > 0
    corr = np.zeros((n_cells, 3))
    A = np.zeros((n_cells, 3, 3))
    b = np.zeros((n_cells, 3))
    if o.mode == "plane":
        r2 = np.bincount(cell, weights=w * r * r, minlength=n_cells)
        for p in range(3):
            b[:, p] = np.bincount(cell, weights=w * r * normals[:, p], minlength=n_cells)
            for q in range(3):
                A[:, p, q] = np.bincount(cell, weights=w * normals[:, p] * normals[:, q], minlength=n_cells)
        # per cell: argmin_d sum_i (n_i . d - r_i)^2 + damping * n |d|^2 (no correction along
        # directions no normal constrains: the current field stays there)
        damped = A + o.normal_damping * np.maximum(n_acc, 1)[:, None, None] * np.eye(3)
        corr[good] = np.linalg.solve(damped[good], b[good][..., None])[..., 0]
    else:
        r2 = np.bincount(cell, weights=w * np.einsum("ij,ij->i", delta, delta), minlength=n_cells)
        for p in range(3):
            b[:, p] = np.bincount(cell, weights=w * delta[:, p], minlength=n_cells)
        A[:] = n_acc[:, None, None] * np.eye(3)
        corr = b / np.maximum(n_acc, 1)[:, None]
    return Corrections(corr, good, n_acc, int(keep.sum()), A, b, r2)
