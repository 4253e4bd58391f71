"""Applying and storing registration transforms (rigid + optional displacement grid).

Frames and directions (all world coordinates are millimetres, RAS+, NIfTI affine convention;
arrays are nibabel-ordered (x, y, z)):

- rigid:     x_fixed = R @ y_moving + t                      (MOVING world mm -> FIXED world mm)
- deformable, stored on a regular axis-aligned grid in the FIXED world frame:
    u = ``fixed_to_moving`` displacement: fixed point x corresponds to the rigidly mapped moving
        point p = x + u(x); its moving world position is y = R^T (p - t).
    v = ``moving_to_fixed`` displacement (numerical inverse of u on the same nodes): a rigidly mapped
        moving point p = R y + t corresponds to the fixed point x = p + v(p).
  Between nodes the fields are interpolated trilinearly (scipy.ndimage.map_coordinates, order 1);
  outside the grid the nearest edge value is used.

Pulling a MOVING image onto the FIXED grid (``warp_labels`` / ``warp_image``) needs the
FIXED -> MOVING mapping; transforming moving points (e.g. landmarks) into the fixed scan needs
MOVING -> FIXED. Both are stored, so both directions are available after ``load_transform``.

The file (``Transform.save``; schema "registration-transform", version 1) is one JSON object: schema,
schema_version, world_frame, rigid {direction, rotation (3x3), translation_mm (3), matrix_moving_to_fixed
(4x4)}, deformable (null for rigid only, else {frame, interpolation, origin_mm, spacing_mm, shape,
fixed_to_moving and moving_to_fixed: {meaning, displacement_mm: float32 C-order base64 array}}), meta
(free-form) and provenance (null, or registration.provenance's record: both inputs' model, weights kind and
checkpoint sha256, their passport files and sha256, the mismatches). Files written before provenance was
recorded lack the key: they load with ``provenance`` None.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from common.core.atomic import atomic_write_json
from common.core.errors import InputError
from common.imaging.geometry import grid_world, world_to_voxel

SCHEMA_NAME = "registration-transform"
SCHEMA_VERSION = 1


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """Compact JSON form of an array: float32, C order, base64."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "order": "C", "base64": base64.b64encode(a.tobytes()).decode()}


def decode_array(obj: dict[str, Any]) -> np.ndarray:
    """Inverse of ``encode_array`` (returns float64)."""
    if obj.get("dtype") != "float32" or obj.get("order", "C") != "C":
        raise ValueError("array must be float32 in C order")
    raw = base64.b64decode(obj["base64"])
    shape = tuple(int(s) for s in obj["shape"])
    a = np.frombuffer(raw, dtype="<f4")
    if a.size != int(np.prod(shape)):
        raise ValueError(f"array data has {a.size} values, shape {list(shape)} needs {int(np.prod(shape))}")
    return a.reshape(shape).astype(np.float64)


def _sample(field_: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Trilinear samples of an (nx, ny, nz, 3) field at (n, 3) fractional grid indices (edge-clamped)."""
    coords = idx.T
    return np.stack([ndimage.map_coordinates(field_[..., c], coords, order=1, mode="nearest") for c in range(3)],
                    axis=1)


@dataclass
class DisplacementGrid:
    """Displacements (mm) on a regular grid aligned with the FIXED world axes (RAS+ mm).

    Node (i, j, k) sits at ``origin + (i, j, k) * spacing``. ``fixed_to_moving`` (nx, ny, nz, 3) is u,
    ``moving_to_fixed`` (same shape) is v; see the module docstring for their meaning.
    """

    origin: np.ndarray
    spacing: np.ndarray
    fixed_to_moving: np.ndarray
    moving_to_fixed: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.fixed_to_moving.shape[:3])  # type: ignore[return-value]

    def nodes_mm(self) -> np.ndarray:
        """(nx*ny*nz, 3) node positions in world mm, C order (x index slowest)."""
        axes = [self.origin[d] + self.spacing[d] * np.arange(self.shape[d]) for d in range(3)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)

    def to_index(self, points_mm: np.ndarray) -> np.ndarray:
        return (np.asarray(points_mm, dtype=np.float64) - self.origin) / self.spacing

    def sample_u(self, points_mm: np.ndarray) -> np.ndarray:
        """u at (n, 3) fixed world mm points."""
        return _sample(self.fixed_to_moving, self.to_index(points_mm))

    def sample_v(self, points_mm: np.ndarray) -> np.ndarray:
        """v at (n, 3) rigidly mapped moving points (mm, fixed frame)."""
        if self.moving_to_fixed is None:
            self.moving_to_fixed = invert_displacement(self)
        return _sample(self.moving_to_fixed, self.to_index(points_mm))

    def jacobian_determinant(self, which: str = "fixed_to_moving") -> np.ndarray:
        """det(I + grad u) at every node (nx, ny, nz), central differences (np.gradient, mm)."""
        f = self.fixed_to_moving if which == "fixed_to_moving" else self.moving_to_fixed
        if f is None:
            f = invert_displacement(self)
        if min(self.shape) < 2:
            raise ValueError("the Jacobian needs at least 2 grid nodes along every axis")
        J = np.empty(self.shape + (3, 3))
        for c in range(3):
            grads = np.gradient(f[..., c], *self.spacing)
            for d in range(3):
                J[..., c, d] = grads[d]
            J[..., c, c] += 1.0
        return np.linalg.det(J)


def invert_displacement(grid: DisplacementGrid, iterations: int = 50, tol_mm: float = 1e-4) -> np.ndarray:
    """Numerical inverse v of u on the grid nodes: v(p) = -u(p + v(p)) by fixed-point iteration.

    Converges when |grad u| < 1 (no folding). Returns an (nx, ny, nz, 3) array in mm.
    """
    p = grid.nodes_mm()
    v = -grid.fixed_to_moving.reshape(-1, 3).copy()
    for _ in range(iterations):
        v_new = -grid.sample_u(p + v)
        change = np.abs(v_new - v).max() if len(v) else 0.0
        v = v_new
        if change < tol_mm:
            break
    return v.reshape(grid.fixed_to_moving.shape)


@dataclass
class Transform:
    """A registration result: rigid (MOVING -> FIXED world mm) plus an optional displacement grid.

    ``rotation`` (3, 3) and ``translation`` (3,) mm give x_fixed = R y_moving + t. ``grid`` holds the
    deformable part in the fixed frame (None for rigid only). ``meta`` is free-form JSON-ready info.
    ``provenance``: where the two inputs came from (registration.provenance.check_inputs); None when not recorded.
    """

    rotation: np.ndarray
    translation: np.ndarray
    grid: DisplacementGrid | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None

    @classmethod
    def identity(cls) -> Transform:
        return cls(np.eye(3), np.zeros(3))

    def rigid_only(self) -> Transform:
        return Transform(self.rotation.copy(), self.translation.copy(), None, dict(self.meta), self.provenance)

    def moving_to_fixed(self, points_mm: np.ndarray, refine: int = 5) -> np.ndarray:
        """Map (n, 3) MOVING world mm points to FIXED world mm.

        Starts from the stored inverse field v and refines with ``refine`` fixed-point steps
        x <- p - u(x), so that the result inverts ``fixed_to_moving`` to within ~1e-3 mm instead of
        carrying the interpolation error of two separately interpolated fields.
        """
        p = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3) @ self.rotation.T + self.translation
        if self.grid is None:
            return p
        x = p + self.grid.sample_v(p)
        for _ in range(refine):
            x = p - self.grid.sample_u(x)
        return x

    def fixed_to_moving(self, points_mm: np.ndarray) -> np.ndarray:
        """Map (n, 3) FIXED world mm points to MOVING world mm (the direction used to pull moving images)."""
        x = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        p = x if self.grid is None else x + self.grid.sample_u(x)
        return (p - self.translation) @ self.rotation

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation
        out: dict[str, Any] = {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "world_frame": "RAS+ mm (NIfTI affine)",
            "rigid": {
                "direction": "moving world mm -> fixed world mm: x_fixed = R @ y_moving + t",
                "rotation": self.rotation.tolist(),
                "translation_mm": self.translation.tolist(),
                "matrix_moving_to_fixed": m.tolist(),
            },
            "deformable": None,
            "meta": self.meta,
            "provenance": self.provenance,
        }
        if self.grid is not None:
            g = self.grid
            if g.moving_to_fixed is None:
                g.moving_to_fixed = invert_displacement(g)
            out["deformable"] = {
                "frame": "regular grid aligned with the fixed world axes; node (i,j,k) at origin + (i,j,k)*spacing",
                "interpolation": "trilinear, edge values outside the grid",
                "origin_mm": g.origin.tolist(),
                "spacing_mm": g.spacing.tolist(),
                "shape": list(g.shape),
                "fixed_to_moving": {
                    "meaning": "u: fixed x corresponds to rigid-frame p = x + u(x); moving y = R^T (p - t)",
                    "displacement_mm": encode_array(g.fixed_to_moving),
                },
                "moving_to_fixed": {
                    "meaning": "v: rigid-frame p = R y + t corresponds to fixed x = p + v(p)",
                    "displacement_mm": encode_array(g.moving_to_fixed),
                },
            }
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transform:
        if d.get("schema") != SCHEMA_NAME:
            raise ValueError(f"not a registration transform (schema {d.get('schema')!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"transform schema version {d.get('schema_version')}, expected {SCHEMA_VERSION}")
        R = np.asarray(d["rigid"]["rotation"], dtype=np.float64)
        t = np.asarray(d["rigid"]["translation_mm"], dtype=np.float64)
        if R.shape != (3, 3) or t.shape != (3,):
            raise ValueError("rigid rotation must be 3x3 and translation 3 values")
        grid = None
        if d.get("deformable"):
            g = d["deformable"]
            u = decode_array(g["fixed_to_moving"]["displacement_mm"])
            v = decode_array(g["moving_to_fixed"]["displacement_mm"]) if g.get("moving_to_fixed") else None
            shape = tuple(int(s) for s in g["shape"])
            if u.shape != shape + (3,) or (v is not None and v.shape != u.shape):
                raise ValueError("displacement arrays do not match the grid shape")
            grid = DisplacementGrid(np.asarray(g["origin_mm"], np.float64), np.asarray(g["spacing_mm"], np.float64),
                                    u, v)
        provenance = d.get("provenance")  # absent in files written before it was recorded
        if provenance is not None and not isinstance(provenance, dict):
            raise ValueError("provenance must be a JSON object or null")
        return cls(R, t, grid, dict(d.get("meta") or {}), provenance)

    def save(self, path: str | Path) -> Path:
        """Write the transform as JSON (displacements base64 float32), atomically."""
        return atomic_write_json(path, self.to_dict(), indent=1)


def load_transform(path: str | Path) -> Transform:
    """Read a transform JSON written by ``Transform.save``; InputError (one line) when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "transform file not found")
    try:
        return Transform.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"not a valid transform file ({type(exc).__name__}: {exc})") from None


# ---- dense warping ----------------------------------------------------------------------------

def warp_array(moving: np.ndarray, moving_affine: np.ndarray, fixed_shape: tuple[int, ...],
               fixed_affine: np.ndarray, transform: Transform, order: int, cval: float = 0.0,
               chunk_voxels: int = 2_000_000) -> np.ndarray:
    """Pull an (x, y, z) MOVING array onto the FIXED voxel grid.

    For each fixed voxel: world x = fixed_affine @ ijk; moving world y = transform.fixed_to_moving(x);
    moving voxel = inv(moving_affine) @ y; value by map_coordinates (``order`` 0 = nearest, 1 = linear;
    ``cval`` outside the moving array). Processed in slabs of whole k-planes to bound memory.
    """
    moving = np.asarray(moving)
    fixed_shape = tuple(int(s) for s in fixed_shape[:3])
    fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
    out = np.empty(fixed_shape, dtype=moving.dtype if order == 0 else np.float32)
    per_plane = max(fixed_shape[0] * fixed_shape[1], 1)
    step = max(1, chunk_voxels // per_plane)
    src = moving if order == 0 else moving.astype(np.float32, copy=False)
    for k0 in range(0, fixed_shape[2], step):
        sl = slice(k0, min(k0 + step, fixed_shape[2]))
        world = grid_world(fixed_shape, fixed_affine, sl)
        y = transform.fixed_to_moving(world)
        vox = world_to_voxel(y, moving_affine)  # moving voxel (i, j, k)
        if order == 0:
            vox = np.rint(vox)  # exact nearest neighbour, also for coordinates a hair off an integer
        vals = ndimage.map_coordinates(src, vox.T, order=order, mode="constant", cval=cval, prefilter=False)
        out[:, :, sl] = vals.reshape(fixed_shape[0], fixed_shape[1], sl.stop - sl.start)
    return out


def warp_labels(moving_labels: np.ndarray, moving_affine: np.ndarray, fixed_shape: tuple[int, ...],
                fixed_affine: np.ndarray, transform: Transform) -> np.ndarray:
    """Nearest-neighbour warp of a MOVING (x, y, z) label map onto the FIXED grid (0 outside)."""
    return warp_array(moving_labels, moving_affine, fixed_shape, fixed_affine, transform, order=0, cval=0)


def warp_image(moving_image: np.ndarray, moving_affine: np.ndarray, fixed_shape: tuple[int, ...],
               fixed_affine: np.ndarray, transform: Transform, cval: float | None = None) -> np.ndarray:
    """Trilinear warp of a MOVING (x, y, z) image onto the FIXED grid (float32).

    ``cval`` fills voxels that map outside the moving image (default: the image minimum, e.g. air in CT).
    """
    if cval is None:
        cval = float(np.min(moving_image)) if np.size(moving_image) else 0.0
    return warp_array(moving_image, moving_affine, fixed_shape, fixed_affine, transform, order=1, cval=cval)
