"""Anatomical passports: per-structure geometry of a label map, in world millimetres.

A passport summarises an (x, y, z) integer label map (nibabel axis order) whose affine maps voxel
indices to world coordinates in mm, RAS+. For every label present it stores the voxel count and
volume, the centroid, the covariance of the voxel centres with its principal axes, bounding boxes
and a deterministic subsample of boundary voxel centres. All outputs are plain Python lists and
floats, ready for JSON.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.atomic import atomic_write_json
from common.errors import InputError

SCHEMA_NAME = "anatomical-passport"
SCHEMA_VERSION = 1
WORLD_FRAME = "RAS+ mm (NIfTI affine)"
RESOLUTIONS = ("model", "original")

TOP_KEYS = ("schema", "schema_version", "world_frame", "scan", "model", "grid", "max_points", "structures",
            "timing_s")
GRID_KEYS = ("resolution", "shape", "spacing_mm", "affine", "orientation")
STRUCTURE_KEYS = ("label", "name", "voxel_count", "volume_mm3", "centroid_mm", "covariance_mm2",
                  "eigenvalues_mm2", "eigenvectors", "bbox_voxel", "bbox_mm", "boundary_points_mm",
                  "n_boundary_voxels")

# 6-connectivity: a voxel is on the boundary when one of its 6 face neighbours is outside the mask.
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)
# The 8 corners of a box as 0/1 choices of (min, max) per axis, shape (8, 3).
_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)


def _as_label_array(labels: np.ndarray) -> np.ndarray:
    """Return ``labels`` as a 3-D integer array (integral floats are accepted and converted)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"label map must be 3-D (x, y, z), got shape {labels.shape}")
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    rounded = np.rint(labels)
    if not np.array_equal(rounded, labels):
        raise ValueError("label map holds non-integer values")
    return rounded.astype(np.int32)


def voxel_to_world(points_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (n, 3) voxel coordinates (x, y, z indices) to (n, 3) world mm through a 4x4 affine."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(points_vox, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(points_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (n, 3) world mm points to (n, 3) fractional voxel coordinates (x, y, z) of ``affine``."""
    return voxel_to_world(points_mm, np.linalg.inv(np.asarray(affine, dtype=np.float64)))


def canonical_eigenvectors(vectors: np.ndarray) -> np.ndarray:
    """Flip eigenvector columns of (..., 3, 3) so each column's largest-|component| entry is positive."""
    vectors = np.asarray(vectors, dtype=np.float64)
    idx = np.argmax(np.abs(vectors), axis=-2)[..., None, :]
    signs = np.sign(np.take_along_axis(vectors, idx, axis=-2))
    signs[signs == 0] = 1.0
    return vectors * signs


def subsample_indices(n: int, max_points: int) -> np.ndarray:
    """At most ``max_points`` evenly spaced, distinct, increasing indices into range(n) (deterministic)."""
    if max_points <= 0:
        return np.zeros(0, dtype=np.int64)
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    return (np.arange(max_points, dtype=np.int64) * n) // max_points


def _crop_geometry(mask: np.ndarray, start: np.ndarray, max_points: int) -> dict[str, Any]:
    """Voxel-space geometry of one structure's boolean crop (x, y, z) whose corner is voxel ``start``.

    Returns count, mean and covariance of voxel indices (voxel units, in the full grid) and the
    boundary voxels (full-grid indices, C order, subsampled) with their count before subsampling.
    """
    idx = np.nonzero(mask)
    n = idx[0].size
    local = np.empty((3, n), dtype=np.float64)
    for axis in range(3):
        local[axis] = idx[axis]
    mean_local = local.mean(axis=1)
    local -= mean_local[:, None]
    cov_vox = (local @ local.T) / n
    # Erosion treats everything outside the crop as background (border_value=0), which is exactly
    # padding the crop by one background voxel: structures touching the crop edge get boundary.
    boundary = mask & ~ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)
    bidx = np.stack(np.nonzero(boundary), axis=1)
    keep = subsample_indices(len(bidx), max_points)
    return {
        "n": n,
        "mean_vox": mean_local + start,
        "cov_vox": cov_vox,
        "boundary_vox": bidx[keep] + start,
        "n_boundary": len(bidx),
    }


def compute_structures(labels: np.ndarray, affine: np.ndarray, label_names: Mapping[int, str],
                       max_points: int = 500) -> list[dict]:
    """Geometry of every label > 0 present in an (x, y, z) label map, sorted by label id.

    ``affine`` maps voxel indices to world mm (RAS+). Works on each label's bounding-box crop
    (scipy.ndimage.find_objects), never on full-volume masks. Units: mm, mm^2, mm^3; eigenvectors
    are the COLUMNS of a 3x3 matrix (world axes x, y, z by rows), eigenvalues ascending, each
    column's largest-|component| entry positive. Covariance is the population (1/n) covariance of
    voxel centres. bbox_voxel is inclusive; bbox_mm is the world axis-aligned box of the 8 corners of
    the index box, taken at the centres of the extreme voxels (like every other point here). Boundary
    voxels have a 6-neighbour outside the structure (outside the array counts as outside); they are
    listed in C order of (x, y, z) indices and subsampled to ``max_points`` at evenly spaced ranks.
    Labels missing from ``label_names`` are named "label_<id>".
    """
    labels = _as_label_array(labels)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    lin = affine[:3, :3]
    voxel_volume = float(abs(np.linalg.det(lin)))

    geoms: list[tuple[int, np.ndarray, np.ndarray, dict[str, Any]]] = []
    for index, slices in enumerate(ndimage.find_objects(labels)):
        if slices is None:
            continue
        label = index + 1
        start = np.array([s.start for s in slices], dtype=np.int64)
        stop = np.array([s.stop for s in slices], dtype=np.int64) - 1
        geoms.append((label, start, stop, _crop_geometry(labels[slices] == label, start, max_points)))
    if not geoms:
        return []

    # World-space covariance A C A^T for all labels at once, then one batched eigendecomposition.
    cov_world = lin @ np.stack([g[3]["cov_vox"] for g in geoms]) @ lin.T
    cov_world = (cov_world + np.swapaxes(cov_world, 1, 2)) / 2
    eigvals, eigvecs = np.linalg.eigh(cov_world)
    eigvecs = canonical_eigenvectors(eigvecs)
    centroids = voxel_to_world(np.stack([g[3]["mean_vox"] for g in geoms]), affine)

    structures = []
    for i, (label, start, stop, geom) in enumerate(geoms):
        corners = voxel_to_world(start + _CORNERS * (stop - start), affine)
        structures.append({
            "label": int(label),
            "name": str(label_names.get(label, f"label_{label}")),
            "voxel_count": int(geom["n"]),
            "volume_mm3": float(geom["n"] * voxel_volume),
            "centroid_mm": centroids[i].tolist(),
            "covariance_mm2": cov_world[i].tolist(),
            "eigenvalues_mm2": eigvals[i].tolist(),
            "eigenvectors": eigvecs[i].tolist(),
            "bbox_voxel": {"min": start.tolist(), "max": stop.tolist()},
            "bbox_mm": {"min": corners.min(axis=0).tolist(), "max": corners.max(axis=0).tolist()},
            "boundary_points_mm": voxel_to_world(geom["boundary_vox"], affine).tolist(),
            "n_boundary_voxels": int(geom["n_boundary"]),
        })
    return structures


def grid_info(shape: tuple[int, ...], affine: np.ndarray, resolution: str) -> dict[str, Any]:
    """Describe a voxel grid: shape (x, y, z), spacing in mm per array axis, 4x4 affine, axis codes."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    affine = np.asarray(affine, dtype=np.float64)
    return {
        "resolution": resolution,
        "shape": [int(s) for s in shape],
        "spacing_mm": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
        "affine": affine.tolist(),
        "orientation": "".join(nib.aff2axcodes(affine)),
    }


def build_passport(labels: np.ndarray, affine: np.ndarray, label_names: Mapping[int, str], *,
                   scan: dict, model: dict, resolution: str, max_points: int = 500) -> dict:
    """Build a passport dict for an (x, y, z) label map on the grid of ``affine`` (voxel -> mm RAS+).

    ``resolution`` says which grid the labels are on: "model" (the network's resampled grid) or
    "original" (the scan's own grid). ``timing_s`` is the wall time of compute_structures in seconds.
    """
    labels = _as_label_array(labels)
    grid = grid_info(labels.shape, affine, resolution)
    t0 = time.perf_counter()
    structures = compute_structures(labels, affine, label_names, max_points=max_points)
    elapsed = time.perf_counter() - t0
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "world_frame": WORLD_FRAME,
        "scan": scan,
        "model": model,
        "grid": grid,
        "max_points": int(max_points),
        "structures": structures,
        "timing_s": float(elapsed),
    }


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, or of a folder's files' contents in sorted relative-path order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def scan_metadata(path: str | Path, image: nib.spatialimages.SpatialImage) -> dict[str, Any]:
    """Identify a scan: file, sha256, shape (x, y, z), spacing in mm, 4x4 affine, orientation codes."""
    affine = np.asarray(image.affine, dtype=np.float64)
    return {
        "file": str(path),
        "sha256": file_sha256(path),
        "shape": [int(s) for s in image.shape],
        "spacing_mm": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
        "affine": affine.tolist(),
        "orientation": "".join(nib.aff2axcodes(affine)),
    }


def save_passport(passport: dict, path: str | Path) -> Path:
    """Write a passport as compact JSON, atomically; return the path."""
    return atomic_write_json(path, passport, indent=None)


def _check_shape(path: Path, where: str, value: Any, shape: tuple[int | None, ...]) -> None:
    """Raise InputError unless ``value`` is a numeric array of ``shape`` (None = any length)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(path, f"{where} is not a numeric array") from None
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape, strict=True)):
        want = "x".join("n" if s is None else str(s) for s in shape)
        raise InputError(path, f"{where} has shape {list(arr.shape)}, expected {want}")
    if not np.all(np.isfinite(arr)):
        raise InputError(path, f"{where} holds non-finite values")


def _require_keys(path: Path, where: str, obj: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(obj, dict):
        raise InputError(path, f"{where} is not a JSON object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputError(path, f"{where} lacks required key(s): {', '.join(missing)}")


def _validate_structure(path: Path, i: int, s: Any, max_points: int) -> None:
    where = f"structures[{i}]"
    _require_keys(path, where, s, STRUCTURE_KEYS)
    for key in ("label", "voxel_count", "n_boundary_voxels"):
        if not isinstance(s[key], int) or isinstance(s[key], bool):
            raise InputError(path, f"{where}.{key} is not an integer")
    if not isinstance(s["name"], str):
        raise InputError(path, f"{where}.name is not a string")
    _check_shape(path, f"{where}.volume_mm3", s["volume_mm3"], ())
    _check_shape(path, f"{where}.centroid_mm", s["centroid_mm"], (3,))
    _check_shape(path, f"{where}.covariance_mm2", s["covariance_mm2"], (3, 3))
    _check_shape(path, f"{where}.eigenvalues_mm2", s["eigenvalues_mm2"], (3,))
    _check_shape(path, f"{where}.eigenvectors", s["eigenvectors"], (3, 3))
    for box in ("bbox_voxel", "bbox_mm"):
        _require_keys(path, f"{where}.{box}", s[box], ("min", "max"))
        for end in ("min", "max"):
            _check_shape(path, f"{where}.{box}.{end}", s[box][end], (3,))
    points = s["boundary_points_mm"]
    if not isinstance(points, list):
        raise InputError(path, f"{where}.boundary_points_mm is not a list")
    if points:
        _check_shape(path, f"{where}.boundary_points_mm", points, (None, 3))
    if len(points) > max_points:
        raise InputError(path, f"{where}.boundary_points_mm has {len(points)} points, more than max_points")


def validate_passport(passport: Any, path: str | Path) -> dict:
    """Check a decoded passport's schema, keys and array shapes; raise InputError naming ``path``."""
    path = Path(path)
    if not isinstance(passport, dict):
        raise InputError(path, "not an anatomical passport (JSON top level is not an object)")
    if passport.get("schema") != SCHEMA_NAME:
        raise InputError(path, f"not an anatomical passport (schema {passport.get('schema')!r}, "
                               f"expected {SCHEMA_NAME!r})")
    version = passport.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(path, f"passport schema version {version}, this program reads version {SCHEMA_VERSION}")
    _require_keys(path, "passport", passport, TOP_KEYS)
    for key in ("scan", "model"):
        if not isinstance(passport[key], dict):
            raise InputError(path, f"{key} is not a JSON object")
    grid = passport["grid"]
    _require_keys(path, "grid", grid, GRID_KEYS)
    _check_shape(path, "grid.shape", grid["shape"], (3,))
    _check_shape(path, "grid.spacing_mm", grid["spacing_mm"], (3,))
    _check_shape(path, "grid.affine", grid["affine"], (4, 4))
    max_points = passport["max_points"]
    if not isinstance(max_points, int) or isinstance(max_points, bool) or max_points < 0:
        raise InputError(path, "max_points is not a non-negative integer")
    structures = passport["structures"]
    if not isinstance(structures, list):
        raise InputError(path, "structures is not a list")
    for i, s in enumerate(structures):
        _validate_structure(path, i, s, max_points)
    return passport


def load_passport(path: str | Path) -> dict:
    """Read and validate a passport JSON file. Raises InputError (one line naming the file) if bad."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "passport file not found")
    try:
        passport = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not a JSON file ({exc})") from None
    return validate_passport(passport, path)


def structure_by_name(passport: dict) -> dict[str, dict]:
    """Map structure name -> structure dict."""
    return {s["name"]: s for s in passport["structures"]}
