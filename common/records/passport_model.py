"""The anatomical passport: typed in memory (numpy arrays), JSON ("anatomical-passport" version 1) only on disk.

World coordinates are mm, RAS+ (the NIfTI affine's frame); voxel indices are (x, y, z) array axes. ``Passport``,
``Grid``, ``Structure`` and ``Box`` are frozen pydantic models: ``Passport.from_json(doc, path)`` checks a decoded
file (keys, types, array shapes, finite values; InputError naming ``path``, one line) and ``to_json()`` gives the
document back, in its key order. In memory, fields are read as attributes (``passport.grid.affine``,
``s.centroid_mm``); JSON appears only on save and load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Self

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator
from pydantic_core import ErrorDetails

from common.core.errors import InputError
from common.core.json_errors import first_error, problem, where

SCHEMA_NAME = "anatomical-passport"
SCHEMA_VERSION = 1
WORLD_FRAME = "RAS+ mm (NIfTI affine)"


def _numeric(value: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    """``value`` as a finite float64 array of ``shape`` (None = any length), else a "passport" problem."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise problem("passport", "is not a numeric array") from None
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape, strict=True)):
        want = "x".join("n" if s is None else str(s) for s in shape)
        raise problem("passport", f"has shape {list(arr.shape)}, expected {want}")
    if not np.all(np.isfinite(arr)):
        raise problem("passport", "holds non-finite values")
    return _frozen(arr)


def _frozen(arr: np.ndarray) -> np.ndarray:
    """A read-only copy of ``arr``: the model owns its arrays, so the caller's later writes cannot change it
    (passport arrays are small: at most max_points x 3 per structure)."""
    copy = np.array(arr, copy=True)
    copy.flags.writeable = False
    return copy


def _array(*shape: int | None) -> BeforeValidator:
    return BeforeValidator(lambda value: _numeric(value, shape))


def _as_given(*shape: int) -> BeforeValidator:
    """Checked like _array, kept in the numbers' own type (voxel indices and counts stay integers)."""
    def check(value: Any) -> np.ndarray:
        _numeric(value, shape)
        return _frozen(np.asarray(value))
    return BeforeValidator(check)


def _shape(value: Any) -> tuple:
    _numeric(value, (3,))
    return tuple(np.asarray(value).tolist())


def _points(value: Any) -> np.ndarray:
    if not isinstance(value, list | np.ndarray):
        raise problem("passport", "is not a list")
    return _numeric(value, (None, 3)) if len(value) else _frozen(np.zeros((0, 3)))


def _scalar(value: Any) -> float:
    return float(_numeric(value, ()))


def _count(value: Any) -> Any:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise problem("passport", "is not a non-negative integer")
    return value


Vector3 = Annotated[np.ndarray, _array(3)]
Matrix3 = Annotated[np.ndarray, _array(3, 3)]


class _Typed(BaseModel):
    """Frozen (arrays read-only too), strict, arrays allowed; equality compares arrays by value."""

    model_config = ConfigDict(frozen=True, strict=True, arbitrary_types_allowed=True)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, k), getattr(other, k)) for k in type(self).model_fields)

    __hash__ = None  # type: ignore[assignment]  (arrays are mutable)

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (name=value), checked like a new object: arrays are converted,
        checked and made read-only (``model_copy(update=...)`` would skip all that)."""
        return self.model_validate({**{k: getattr(self, k) for k in type(self).model_fields}, **changes})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.shape(a) == np.shape(b) and bool(np.array_equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class Box(_Typed):
    """An axis-aligned box: ``min`` and ``max`` corners (3,), inclusive voxel indices or world mm."""

    min: Annotated[np.ndarray, _as_given(3)]
    max: Annotated[np.ndarray, _as_given(3)]

    def to_json(self) -> dict[str, list]:
        return {"min": self.min.tolist(), "max": self.max.tolist()}


class Structure(_Typed):
    """One label's geometry: voxel count, volume (mm^3), centroid (3,) mm, covariance (3, 3) mm^2 of the voxel
    centres with its eigenvalues (3,) ascending and eigenvectors as the COLUMNS of (3, 3), index and world boxes,
    and up to max_points boundary voxel centres (n, 3) mm of n_boundary_voxels."""

    label: int
    name: str
    voxel_count: int
    volume_mm3: Annotated[float, BeforeValidator(_scalar)]
    centroid_mm: Vector3
    covariance_mm2: Matrix3
    eigenvalues_mm2: Vector3
    eigenvectors: Matrix3
    bbox_voxel: Box
    bbox_mm: Box
    boundary_points_mm: Annotated[np.ndarray, BeforeValidator(_points)]
    n_boundary_voxels: int

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "name": self.name, "voxel_count": self.voxel_count,
                "volume_mm3": self.volume_mm3, "centroid_mm": self.centroid_mm.tolist(),
                "covariance_mm2": self.covariance_mm2.tolist(), "eigenvalues_mm2": self.eigenvalues_mm2.tolist(),
                "eigenvectors": self.eigenvectors.tolist(), "bbox_voxel": self.bbox_voxel.to_json(),
                "bbox_mm": self.bbox_mm.to_json(), "boundary_points_mm": self.boundary_points_mm.tolist(),
                "n_boundary_voxels": self.n_boundary_voxels}


class Grid(_Typed):
    """The voxel grid the labels were on: "model" or "original" resolution, shape (x, y, z), spacing (3,) mm per
    array axis, 4x4 affine voxel -> world mm, orientation codes ("RAS")."""

    resolution: str
    shape: Annotated[tuple[Any, ...], BeforeValidator(_shape)]
    spacing_mm: Vector3
    affine: Annotated[np.ndarray, _array(4, 4)]
    orientation: str

    def to_json(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "shape": list(self.shape), "spacing_mm": self.spacing_mm.tolist(),
                "affine": self.affine.tolist(), "orientation": self.orientation}


class Passport(_Typed):
    """A label map's passport: the scan and model it came from (free-form JSON objects), its grid, the boundary
    point limit, one Structure per label present (by label id) and the seconds compute_structures took."""

    world_frame: str
    scan: dict[str, Any]
    model: dict[str, Any]
    grid: Grid
    max_points: Annotated[int, BeforeValidator(_count)]
    structures: list[Structure]
    timing_s: float

    @model_validator(mode="after")
    def _points_within_limit(self) -> Passport:
        for i, s in enumerate(self.structures):
            if len(s.boundary_points_mm) > self.max_points:
                raise problem("passport", f"has {len(s.boundary_points_mm)} points, more than max_points",
                              at=f"structures[{i}].boundary_points_mm")
        return self

    def to_json(self) -> dict[str, Any]:
        """The JSON document (plain lists and numbers), keys in the file's order."""
        return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "world_frame": self.world_frame,
                "scan": self.scan, "model": self.model, "grid": self.grid.to_json(), "max_points": self.max_points,
                "structures": [s.to_json() for s in self.structures], "timing_s": self.timing_s}

    @classmethod
    def from_json(cls, doc: Any, path: str | Path) -> Passport:
        """Check a decoded passport file (schema, version, keys, types, array shapes); InputError naming ``path``."""
        if not isinstance(doc, dict):
            raise InputError(path, "not an anatomical passport (JSON top level is not an object)")
        if doc.get("schema") != SCHEMA_NAME:
            raise InputError(path, f"not an anatomical passport (schema {doc.get('schema')!r}, "
                                   f"expected {SCHEMA_NAME!r})")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(path, f"passport schema version {version}, this program reads version {SCHEMA_VERSION}")
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            raise InputError(path, _message(exc)) from None


def _message(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    err = first_error(exc)
    missing = [e for e in errors if e["type"] == "missing" and len(e["loc"]) == 1] or \
              [e for e in errors if e["type"] == "missing" and e["loc"][:-1] == err["loc"][:-1]]
    if missing:
        parent = where({"loc": missing[0]["loc"][:-1]}) or "passport"  # type: ignore[typeddict-item]
        return f"{parent} lacks required key(s): {', '.join(str(e['loc'][-1]) for e in missing)}"
    return f"{where(err)} {_words(err)}"


_WORDS = {"model_type": "is not a JSON object", "dict_type": "is not a JSON object",
          "int_type": "is not an integer", "string_type": "is not a string", "tuple_type": "is not a list",
          "list_type": "is not a list", "float_type": "is not a number"}


def _words(err: ErrorDetails) -> str:
    return err["msg"] if err["type"] == "passport" else _WORDS.get(err["type"], err["msg"])
