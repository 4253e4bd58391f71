"""Label maps: one home for the TotalSegmentator class names, the integer-label check and the grid tolerance.

A label map is an integer array, (x, y, z) like nibabel's; 0 is background, every other value a class id.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from common.core.errors import InputError

GRID_ATOL_MM = 1e-4  # two voxel grids are the same when their 4x4 affines agree to this (mm; float32 NIfTI keeps it)


@functools.cache
def _total_class_map() -> tuple[tuple[int, str], ...]:
    from totalsegmentator.map_to_binary import class_map

    return tuple(sorted((int(k), str(v)) for k, v in class_map["total"].items()))


def total_class_names() -> dict[int, str]:
    """TotalSegmentator's "total" task (Task 297): label id -> class name, ids ascending. ImportError when the
    official package is not installed."""
    return dict(_total_class_map())


def total_class_names_if_installed() -> dict[int, str]:
    """total_class_names(), or {} where the official package is not installed (names are then cosmetic:
    callers fall back to "label_<id>")."""
    try:
        return total_class_names()
    except ImportError:
        return {}


def total_class_ids() -> dict[str, int]:
    """TotalSegmentator's "total" task: class name -> label id."""
    return {name: idx for idx, name in _total_class_map()}


def as_label_array(data: np.ndarray, ndim: int | None = None, *, negative_as_background: bool = False) -> np.ndarray:
    """``data`` as an integer label array: the one policy for every label map the project reads.

    bool becomes uint8; integral floats become int32 (a float map from another tool is accepted only if every
    value is a whole number: nothing is rounded silently); integers are kept. ValueError (one line) for
    non-integer values, a non-numeric dtype, a dimension other than ``ndim`` (when given), and negative labels
    unless ``negative_as_background`` (passports: a negative value is no structure, they become 0).
    """
    arr = np.asarray(data)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"label map is {arr.ndim}-D with shape {arr.shape}, expected {ndim}-D (x, y, z)")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):  # NaN is never equal: rejected too
            raise ValueError("label map holds non-integer values")
        small = not arr.size or np.abs(rounded).max() <= np.iinfo(np.int32).max
        arr = rounded.astype(np.int32 if small else np.int64)  # int32 halves the memory; no overflow either way
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"label map has non-integer dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        if not negative_as_background:
            raise ValueError("label map holds negative labels")
        arr = np.maximum(arr, 0)
    return arr


def checked_label_array(data: np.ndarray, path: str | Path | None, ndim: int | None = 3, *,
                        negative_as_background: bool = False) -> np.ndarray:
    """as_label_array for a label map read from ``path``: its ValueError becomes an InputError naming the file."""
    try:
        return as_label_array(data, ndim, negative_as_background=negative_as_background)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None


def same_grid(shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...], affine_b: np.ndarray) -> bool:
    """True when two (x, y, z) grids have the same shape and affines equal within GRID_ATOL_MM."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=GRID_ATOL_MM, rtol=0)
