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

Every parameter is a field of registration.options.DeformableOptions. The phases are functions of their
own: registration.correspondence (select_structures, surface_points, match_step) and registration.spline
(control_cells, initial_field, refit, displacement_grid); ``register_deformable`` runs them in order.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from registration.correspondence import StructureSelection, match_step, select_structures, surface_points
from registration.options import DeformableOptions, with_overrides
from registration.rigid import RigidResult
from registration.spline import control_cells, displacement_grid, initial_field, refit
from registration.structures import Structures
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


def _centroid_history(sel: StructureSelection, displacements: np.ndarray) -> dict[str, Any]:
    """The "centroids" entry of the history: the initial field's inputs and the consistency test."""
    ok = ~sel.inconsistent
    return {"step": "centroids", "n_points": int(len(sel.fixed_centroids)),
            "centroid_disp_mm_mean": float(np.linalg.norm(displacements, axis=1).mean()) if len(displacements)
            else 0.0,
            "consistency_err_mm_max_used": float(sel.consistency_err_mm[ok].max()) if ok.any() else 0.0,
            "inconsistent": {n: float(e) for n, e, b in zip(sel.candidates, sel.consistency_err_mm, sel.inconsistent,
                                                            strict=True) if b}}


def register_deformable(fixed: Structures, moving: Structures, rigid: RigidResult,
                        options: DeformableOptions | None = None, **overrides: Any) -> DeformableResult:
    """Fit the deformable tier after ``rigid`` (see the module docstring); returns a DeformableResult.

    ``options``: a DeformableOptions (default DeformableOptions(), or DeformableOptions(**overrides) from
    keyword settings, e.g. ``smoothing=1e4, bbox_mm=...``). The result's ``settings`` are ``asdict(options)``
    plus what the run derived (cell size used, number of cells, whether the control-point floor applied).
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
    times["prepare"] = (time.perf_counter() - t0) * 1000.0

    t0 = time.perf_counter()
    tps, u_cell = initial_field(cf_a, d_c, cells.centres, o.centroid_smoothing)
    times["init"] = (time.perf_counter() - t0) * 1000.0
    history: list[dict[str, Any]] = [_centroid_history(sel, d_c)]

    # ICP rounds with TPS regularisation
    t_match = t_fit = 0.0
    n_used_cells = 0
    for it in range(o.iterations if cells.n_cells else 0):
        t0 = time.perf_counter()
        c = match_step(surf, cells.cell, cells.n_cells, u_cell, o)
        t_match += time.perf_counter() - t0
        t0 = time.perf_counter()
        new_tps, u_new = refit(cells.centres, u_cell, c.correction, c.good, c.n_accepted, cf_a, d_c, o)
        if new_tps is not None:
            tps = new_tps
        t_fit += time.perf_counter() - t0
        history.append({
            "step": f"icp{it + 1}", "n_matches": c.n_matches, "n_cells": int(c.good.sum()),
            "correction_mm_mean": float(np.linalg.norm(c.correction[c.good], axis=1).mean()) if c.good.any() else 0.0,
            "field_change_mm_max": float(np.abs(u_new - u_cell).max()) if len(u_new) else 0.0,
        })
        u_cell = u_new
        n_used_cells = int(c.good.sum())
    times["match"] = t_match * 1000.0
    times["fit"] = t_fit * 1000.0

    # evaluate on the coarse grid, invert
    t0 = time.perf_counter()
    grid = displacement_grid(tps, [*sel.fixed_points, *sel.moving_points, cf_a, cm_a], d_c, o)
    times["grid"] = (time.perf_counter() - t0) * 1000.0
    t0 = time.perf_counter()
    grid.moving_to_fixed = invert_displacement(grid)
    times["inverse"] = (time.perf_counter() - t0) * 1000.0
    times["total"] = (time.perf_counter() - t_all) * 1000.0
    n_cells, n_centroids = cells.n_cells, len(cf_a)
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
            "cell_mm_used": cells.size_mm, "n_cells": n_cells, "max_control_points_effective": n_cells + n_centroids,
            "budget_floor_applied": cells.floor_applied,
            "budget_note": (f"max_control_points {o.max_control_points} is below the floor of one control point "
                            f"per structure plus centroids: {n_cells} cells + {n_centroids} centroids used")
            if cells.floor_applied else None,
        },
    )


def to_transform(rigid: RigidResult, deformable: DeformableResult | None = None,
                 meta: dict[str, Any] | None = None) -> Transform:
    """Combine the tiers into a Transform (rigid MOVING->FIXED + fixed-frame displacement grid)."""
    return Transform(rigid.rotation.copy(), rigid.translation.copy(),
                     None if deformable is None else deformable.grid, dict(meta or {}))
