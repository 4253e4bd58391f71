"""Access to passport structures for registration (only the fields registration needs).

Registration reads, per structure (common.records.passport_model.Structure): name, voxel_count, volume_mm3,
centroid_mm, eigenvalues_mm2 (ascending), eigenvectors (3x3, eigenvectors as COLUMNS) and
boundary_points_mm (n x 3). All coordinates are world millimetres, RAS+ (NIfTI affine convention). A passport
here is a typed Passport or just its structures (``Structures``): what compute_structures returns, or
synthetic structures that have no scan behind them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from common.records.passport_model import Passport, Structure

Structures = Passport | Sequence[Structure]


def structure_table(passport: Structures, min_voxels: int = 1) -> dict[str, Structure]:
    """Map name -> structure for a passport or a plain sequence of structures.

    Structures with fewer than ``min_voxels`` voxels are left out (centroids are always finite: the model
    checks them). When a name occurs twice (should not happen in a valid passport) the larger structure is
    kept.
    """
    structures = passport.structures if isinstance(passport, Passport) else passport
    table: dict[str, Structure] = {}
    for s in structures:
        if s.voxel_count < min_voxels:
            continue
        if s.name in table and table[s.name].voxel_count >= s.voxel_count:
            continue
        table[s.name] = s
    return table


def matched_names(fixed: Mapping[str, Structure], moving: Mapping[str, Structure]) -> list[str]:
    """Names present in both tables, in the fixed table's order."""
    return [n for n in fixed if n in moving]


def centroid(s: Structure) -> np.ndarray:
    """Centroid (3,) in world mm (a fresh, writeable array, like every accessor here)."""
    return np.array(s.centroid_mm, dtype=np.float64)


def boundary_points(s: Structure) -> np.ndarray:
    """Boundary points (n, 3) in world mm (n may be 0)."""
    return np.array(s.boundary_points_mm, dtype=np.float64)


def eigen(structures: Sequence[Structure]) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues (n, 3) mm^2 ascending, eigenvectors (n, 3, 3) as columns) of ``structures``."""
    vals = np.array([s.eigenvalues_mm2 for s in structures], dtype=np.float64).reshape(-1, 3)
    vecs = np.array([s.eigenvectors for s in structures], dtype=np.float64).reshape(-1, 3, 3)
    return vals, vecs


def geometry_problem(passport: Structures, tol_mm: float = 1e-6) -> str | None:
    """Why a passport's points cannot anchor a registration (None if they can): all structure centroids at
    one point or on one line, or all boundary points at one point. Real passports never look like that;
    a corrupt or hand-edited one does, and the spline would then face a singular system. ``tol_mm``: mm."""
    table = structure_table(passport)
    centres = np.array([centroid(s) for s in table.values()]).reshape(-1, 3)
    points = np.concatenate([boundary_points(s) for s in table.values()] or [np.zeros((0, 3))])
    if len(centres) >= 2 and np.ptp(centres, axis=0).max() <= tol_mm:
        return f"all {len(centres)} structure centroids are the same point {np.round(centres[0], 3).tolist()} mm"
    if len(centres) >= 3:
        spread = np.linalg.svd(centres - centres.mean(axis=0), compute_uv=False)
        if spread[1] <= tol_mm * max(1.0, spread[0]):
            return f"all {len(centres)} structure centroids lie on one line"
    if len(points) >= 2 and np.ptp(points, axis=0).max() <= tol_mm:
        return f"all {len(points)} boundary points are the same point {np.round(points[0], 3).tolist()} mm"
    return None
