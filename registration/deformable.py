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
4. ``iterations`` rounds of ICP: predict every surface point's moving position with the current field
   (value at its cell), find its nearest rigidly mapped moving boundary points of the same structure
   (only MUTUAL nearest neighbours by default), compare the local mean moving surface with the local mean
   fixed surface ALONG THE FIXED NORMAL (point-to-plane: no sliding along surfaces), reject matches above
   max(``outlier_floor_mm``, ``outlier_factor`` x median), and solve the linearised problem for the
   field at all control nodes at once (registration.spline_system: the point-to-plane residuals of every
   cell plus the centroid displacements against the TPS bending energy, ``smoothing`` per matched point;
   the directions no normal constrains are left to the bending energy, not pinned to the previous field);
   with ``symmetric`` (off by default) the residual is taken along the sum of the fixed and the matched moving
   normal (Rusinkiewicz 2019), which lets curvature say something about sliding: measured, it moved the 20 mm
   family's mean body TRE by -1 to -4 % and the breathing family's by -1 to +4 % (README, registration
   accuracy), so it is not the default;
5. the check (registration.validation): k-fold cross-validation on held-out cells chooses the smoothing
   among ``smoothing`` x ``smoothing_factors`` and keeps the spline only when it predicts the held-out
   matches better than the rigid result (``validate``; otherwise the field is zero: the rigid result);
6. no folding: while the field folds (det J <= 0 on a grid node) the next larger candidate is used, and
   at the largest the spline is dropped.

Measured on the real CT with known transforms (registration/evaluate.py): raw nearest-neighbour
point matches with little smoothing made the dense error WORSE than rigid alone; point-to-plane,
local surface means and cells make the spline help; the global solve (instead of refitting per-cell
targets, which pinned tangential motion and needed 16 rounds) and the cross-validated smoothing brought
the 20 mm case from 1.76 to about 1.2 mm mean body TRE, and the held-out check keeps rigid pairs rigid.

The final spline is evaluated on a coarse regular grid (about ``grid_points`` nodes over the union of
the two point clouds, the optional ``bbox_mm`` and ``margin_mm``) and interpolated trilinearly.

Every parameter is a field of registration.options.DeformableOptions. The phases are functions of their
own: registration.correspondence (select_structures, surface_points, match_step), registration.spline
(control_cells, initial_field, displacement_grid), ``linearised_round`` here, registration.spline_system
(SplineSystem.solve, NodeSpline) and registration.validation (block_folds, cross_validate);
``register_deformable`` runs them in order.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from registration.correspondence import (
    Corrections,
    StructureSelection,
    match_step,
    select_structures,
    surface_points,
)
from registration.options import DeformableOptions, with_overrides
from registration.rigid import RigidResult
from registration.spline import control_cells, displacement_grid, initial_field
from registration.spline_system import LinearisedData, NodeSpline, SplineSystem
from registration.structures import Structures, structure_table
from registration.transform import DisplacementGrid, Transform, invert_displacement
from registration.validation import block_folds, cross_validate


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
    accepted: bool = True
    validation: dict[str, Any] | None = None

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
            "accepted": bool(self.accepted),
            "validation": self.validation,
            "history": self.history,
            "time_ms": {k: float(v) for k, v in self.time_ms.items()},
            "settings": dict(self.settings),
        }


def jacobian_stats(grid: DisplacementGrid) -> dict[str, float | None]:
    """Folding of the fixed->moving map x -> x + u(x) (u in mm) on the grid nodes: the fraction of nodes with
    det(J) <= 0 or not finite (a NaN/inf field counts as folded), min det(J) over the finite nodes, and the
    standard deviation of log det(J) over the nodes with a finite det(J) > 0. Every value is a finite float or
    None (JSON null: no finite node, or no node with det(J) > 0, e.g. a field folded everywhere), so the JSON
    writers (allow_nan=False) never meet a NaN."""
    det = grid.jacobian_determinant()
    finite = np.isfinite(det)
    pos = det[finite & (det > 0)]
    return {
        "fraction_nonpositive": float(np.mean(~finite | (det <= 0))) if det.size else 0.0,
        "det_min": float(det[finite].min()) if finite.any() else None,
        "log_det_std": float(np.std(np.log(pos))) if pos.size else None,
    }


def _folds(grid: DisplacementGrid) -> bool:
    """True when the grid's field folds (det(J) <= 0 at a node) or is not finite (mm values NaN/inf)."""
    det = grid.jacobian_determinant()
    return not np.all(np.isfinite(det)) or float(det.min()) <= 0


def _centroid_history(sel: StructureSelection, displacements: np.ndarray) -> dict[str, Any]:
    """The "centroids" entry of the history: the initial field's inputs and the consistency test."""
    ok = ~sel.inconsistent
    return {"step": "centroids", "n_points": int(len(sel.fixed_centroids)),
            "centroid_disp_mm_mean": float(np.linalg.norm(displacements, axis=1).mean()) if len(displacements)
            else 0.0,
            "consistency_err_mm_max_used": float(sel.consistency_err_mm[ok].max()) if ok.any() else 0.0,
            "inconsistent": {n: float(e) for n, e, b in zip(sel.candidates, sel.consistency_err_mm, sel.inconsistent,
                                                            strict=True) if b}}


def linearised_round(c: Corrections, F: np.ndarray, d_c: np.ndarray, centroid_weight: float | np.ndarray,
                     damping: float) -> LinearisedData:
    """The round's normal equations at node values ``F`` (cells, then centroids): the cells' matches with
    ``damping`` x matches x I towards ``F`` (a trust region), the centroids' displacements ``d_c`` (mm) with
    weight ``centroid_weight`` (one value, or one per centroid)."""
    nc = len(c.A)
    A = np.zeros((len(F), 3, 3))
    b = np.zeros((len(F), 3))
    r2 = np.zeros(len(F))
    A[:nc] = c.A + damping * np.maximum(c.n_accepted, 1)[:, None, None] * np.eye(3)
    b[:nc], r2[:nc] = c.b, c.r2
    w = np.broadcast_to(np.asarray(centroid_weight, dtype=np.float64), (len(F) - nc,))
    A[nc:] = w[:, None, None] * np.eye(3)
    b[nc:] = w[:, None] * (d_c - F[nc:])
    r2[nc:] = w * np.sum((d_c - F[nc:]) ** 2, axis=1)
    return LinearisedData(A, b, F.copy(), r2)


def _centroid_weight(o: DeformableOptions, radii_mm: np.ndarray) -> np.ndarray:
    """Weight of each centroid displacement against one matched point: smoothing / centroid_smoothing, times
    min(1, (``centroid_radius_mm`` / r)^2) for a structure of RMS radius r (mm): under a non-linear
    deformation the centroid of the deformed structure leaves the deformed centroid by about half the
    field's curvature times r^2, so a large organ's centroid is a poor landmark (its surface says more)."""
    if o.centroid_smoothing == o.smoothing or o.smoothing <= 0:
        base = 1.0
    else:
        base = float(min(o.smoothing / max(o.centroid_smoothing, 1e-9), 1e6))
    if o.centroid_radius_mm <= 0:
        return np.full(len(radii_mm), base)
    return base * np.minimum(1.0, (o.centroid_radius_mm / np.maximum(radii_mm, 1e-6)) ** 2)


def register_deformable(fixed: Structures, moving: Structures, rigid: RigidResult,
                        options: DeformableOptions | None = None, **overrides: Any) -> DeformableResult:
    """Fit the deformable tier after ``rigid`` (see ``_register_deformable``), its BLAS on one thread: its
    matrix products are small and memory-bound, and a second BLAS thread made the full-passport timing 1.5-4x
    slower on a shared 2-core machine (threadpoolctl; the previous limit is restored on return)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _register_deformable(fixed, moving, rigid, options, **overrides)


def _register_deformable(fixed: Structures, moving: Structures, rigid: RigidResult,
                         options: DeformableOptions | None = None, **overrides: Any) -> DeformableResult:
    """Fit the deformable tier after ``rigid`` (see the module docstring); returns a DeformableResult.

    ``options``: a DeformableOptions (default DeformableOptions(), or DeformableOptions(**overrides) from
    keyword settings, e.g. ``smoothing=1e4, bbox_mm=...``). The result's ``settings`` are ``asdict(options)``
    plus what the run derived (cell size used, number of cells, whether the control-point floor applied);
    its ``validation`` holds the smoothing chosen and the accept/reject decision (``accepted``: False means
    a zero field, i.e. the rigid result).
    """
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    o = with_overrides(DeformableOptions, options, overrides)
    t0 = t_all
    sel = select_structures(fixed, moving, rigid, o)
    cf_a, cm_a = sel.fixed_centroids, sel.moving_centroids
    d_c = cm_a - cf_a
    surf = surface_points(sel, o)
    cells = control_cells(surf.points, surf.owner, len(cf_a), o)
    table = structure_table(fixed, o.min_voxels)
    radii = np.array([np.sqrt(max(float(np.sum(table[n].eigenvalues_mm2)), 0.0)) for n in sel.used])
    nc, w_c = cells.n_cells, _centroid_weight(o, radii.reshape(-1))
    nodes = np.concatenate([cells.centres, cf_a])
    counts = np.concatenate([np.bincount(cells.cell, minlength=nc).astype(np.float64), w_c])
    times["prepare"] = (time.perf_counter() - t0) * 1000.0

    t0 = time.perf_counter()
    tps0, _ = initial_field(cf_a, d_c, cells.centres, o.centroid_smoothing)
    F0 = tps0(nodes) if tps0 is not None and len(nodes) else np.tile(
        d_c.mean(axis=0) if len(d_c) else np.zeros(3), (len(nodes), 1))
    system = SplineSystem(nodes, counts) if len(nodes) >= 5 else None
    times["init"] = (time.perf_counter() - t0) * 1000.0
    history: list[dict[str, Any]] = [_centroid_history(sel, d_c)]

    # ICP rounds: match with the current field, solve the linearised problem (registration.spline_system)
    t_match = t_fit = 0.0
    F, data, c = F0.copy(), None, None
    for it in range(o.iterations if nc and system is not None else 0):
        t0 = time.perf_counter()
        c = match_step(surf, cells.cell, nc, F[:nc], o)
        t_match += time.perf_counter() - t0
        t0 = time.perf_counter()
        data = linearised_round(c, F, d_c, w_c, o.trust_damping)
        F_new, _ = system.solve(data, o.smoothing, F)
        t_fit += time.perf_counter() - t0
        history.append({
            "step": f"icp{it + 1}", "n_matches": c.n_matches, "n_cells": int(c.good.sum()),
            "correction_mm_mean": float(np.linalg.norm(c.correction[c.good], axis=1).mean()) if c.good.any() else 0.0,
            "field_change_mm_max": float(np.abs(F_new - F).max()) if len(F) else 0.0,
        })
        F = F_new
    times["match"] = t_match * 1000.0
    times["fit"] = t_fit * 1000.0

    # the smoothing and the accept/reject decision from held-out matches (registration.validation)
    t0 = time.perf_counter()
    candidates = sorted({o.smoothing * f for f in o.smoothing_factors})
    validation = None
    lam = o.smoothing
    if data is not None and c is not None:
        folds = block_folds(cells.centres, o.cv_folds, o.cv_block_mm)
        validation = cross_validate(system, data, folds, candidates, F0, c.n_accepted, o.accept_margin,
                                    o.accept_min_gain_mm, precondition_with=o.smoothing)
        lam = validation.chosen
        if lam != o.smoothing:
            F, _ = system.solve(data, lam, F, precondition_with=o.smoothing)
        if o.validate and not validation.accepted:
            F = np.zeros_like(F)
    times["validate"] = (time.perf_counter() - t0) * 1000.0

    # evaluate on the coarse grid (more smoothing while it folds), invert
    t0 = time.perf_counter()
    clouds = [*sel.fixed_points, *sel.moving_points, cf_a, cm_a]
    notes = validation.notes if validation is not None else []
    if system is None:
        grid = displacement_grid(tps0, clouds, d_c, o)
    else:
        grid = displacement_grid(NodeSpline(system, F), clouds, d_c, o)
        larger = [v for v in candidates if v > lam] if data is not None else []
        while np.any(F) and _folds(grid):
            if larger and np.all(np.isfinite(F)):
                lam = larger.pop(0)
                F, _ = system.solve(data, lam, F, precondition_with=o.smoothing)
                notes.append(f"folding: smoothing raised to {lam:g}")
            else:
                F = np.zeros_like(F)
                notes.append("folding (or a non-finite field) at every smoothing candidate: spline dropped")
            grid = displacement_grid(NodeSpline(system, F), clouds, d_c, o)
    times["grid"] = (time.perf_counter() - t0) * 1000.0
    t0 = time.perf_counter()
    grid.moving_to_fixed = invert_displacement(grid)
    times["inverse"] = (time.perf_counter() - t0) * 1000.0
    times["total"] = (time.perf_counter() - t_all) * 1000.0
    n_used_cells = int(c.good.sum()) if c is not None else 0
    n_centroids = len(cf_a)
    accepted = bool(np.any(F)) if system is not None else tps0 is not None or bool(np.any(d_c))
    return DeformableResult(
        grid=grid,
        n_control_points=n_used_cells + n_centroids,
        n_centroids=n_centroids,
        structures_used=sel.used,
        structures_excluded=sel.excluded,
        history=history,
        time_ms=times,
        settings={
            **asdict(o),
            "cell_mm_used": cells.size_mm, "n_cells": nc, "max_control_points_effective": nc + n_centroids,
            "budget_floor_applied": cells.floor_applied,
            "budget_note": (f"max_control_points {o.max_control_points} is below the floor of one control point "
                            f"per structure plus centroids: {nc} cells + {n_centroids} centroids used")
            if cells.floor_applied else None,
            "smoothing_used": float(lam),
        },
        accepted=accepted,
        validation=validation.to_dict() if validation is not None else None,
    )


def to_transform(rigid: RigidResult, deformable: DeformableResult | None = None,
                 meta: dict[str, Any] | None = None) -> Transform:
    """Combine the tiers into a Transform (rigid MOVING->FIXED + fixed-frame displacement grid)."""
    return Transform(rigid.rotation.copy(), rigid.translation.copy(),
                     None if deformable is None else deformable.grid, dict(meta or {}))
