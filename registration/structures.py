"""Access to passport structures for registration (only the fields registration needs).

Registration reads, per structure: name, centroid_mm, eigenvectors (3x3, eigenvectors as COLUMNS),
eigenvalues_mm2 (ascending), voxel_count and boundary_points_mm (n x 3). All coordinates are world
millimetres, RAS+ (NIfTI affine convention). volume_mm3 is used when present. A passport is the typed
common.passport_model.Passport (or its list of Structure); a passport-shaped dict ("structures": [{...}]) or a
list of structure dicts is read the same way.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.passport_model import Passport, Structure

StructureLike = Structure | Mapping[str, Any]
PassportLike = Passport | Mapping[str, Any] | Sequence[StructureLike]


def _get(s: StructureLike, key: str, default: Any = None) -> Any:
    """A structure's field ``key`` (typed Structure or dict), ``default`` when a dict lacks it."""
    return getattr(s, key) if isinstance(s, Structure) else s.get(key, default)


def structure_table(passport: PassportLike, min_voxels: int = 1) -> dict[str, StructureLike]:
    """Map name -> structure for a passport (typed, or a dict with "structures") or a plain list of structures.

    Structures with fewer than ``min_voxels`` voxels or without a finite centroid are left out. When a
    name occurs twice (should not happen in a valid passport) the larger structure is kept.
    """
    structures = passport.structures if isinstance(passport, Passport) else \
        passport["structures"] if isinstance(passport, Mapping) else passport
    table: dict[str, StructureLike] = {}
    for s in structures:
        if int(_get(s, "voxel_count", 1)) < min_voxels:
            continue
        c = np.asarray(_get(s, "centroid_mm", [np.nan] * 3), dtype=np.float64)
        if c.shape != (3,) or not np.all(np.isfinite(c)):
            continue
        name = str(_get(s, "name"))
        if name in table and int(_get(table[name], "voxel_count", 0)) >= int(_get(s, "voxel_count", 0)):
            continue
        table[name] = s
    return table


def matched_names(fixed: Mapping[str, StructureLike], moving: Mapping[str, StructureLike]) -> list[str]:
    """Names present in both tables, in the fixed table's order."""
    return [n for n in fixed if n in moving]


def centroid(s: StructureLike) -> np.ndarray:
    """Centroid (3,) in world mm (a fresh array, like every accessor here)."""
    return np.array(s.centroid_mm if isinstance(s, Structure) else s["centroid_mm"], dtype=np.float64)


def boundary_points(s: StructureLike) -> np.ndarray:
    """Boundary points (n, 3) in world mm (n may be 0)."""
    pts = np.array(_get(s, "boundary_points_mm", []), dtype=np.float64)
    return pts.reshape(-1, 3)


def eigen(s: StructureLike) -> tuple[np.ndarray, np.ndarray] | None:
    """(eigenvalues (3,) mm^2 ascending, eigenvectors (3, 3) as columns) or None when absent/invalid."""
    vals, vecs = _get(s, "eigenvalues_mm2"), _get(s, "eigenvectors")
    if vals is None or vecs is None:
        return None
    vals = np.array(vals, dtype=np.float64)
    vecs = np.array(vecs, dtype=np.float64)
    if vals.shape != (3,) or vecs.shape != (3, 3) or not (np.all(np.isfinite(vals)) and np.all(np.isfinite(vecs))):
        return None
    return vals, vecs


def size_mm3(s: StructureLike) -> float:
    """A resolution-independent size of a structure: volume_mm3 if present, else (sum of eigenvalues)^1.5."""
    if _get(s, "volume_mm3") is not None:
        return float(_get(s, "volume_mm3"))
    e = eigen(s)
    return float(np.sum(np.maximum(e[0], 0.0)) ** 1.5) if e is not None else float("nan")


def geometry_problem(passport: PassportLike, tol_mm: float = 1e-6) -> str | None:
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
