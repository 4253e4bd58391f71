"""Segmentation agreement and latency statistics.

Label maps are integer arrays of identical shape, indexed (x, y, z) like nibabel arrays (any axis order
works as long as both maps use the same one). Label 0 is background. Times are seconds.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from common.imaging.labels import as_label_array

DICE_BUCKETS = (">0.95", "0.90-0.95", "0.85-0.90", "<0.85")
DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)

_CHUNK = 1 << 24  # voxels per bincount pass (bounds the int64 temporaries to ~128 MiB)
_MAX_DENSE_LABEL = 4096  # above this, labels are remapped to dense indices before counting


def _as_labels(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as an integer label array (common.imaging.labels.as_label_array); ValueError "<name>: <problem>"."""
    try:
        return as_label_array(a)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _check_shapes(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")


def voxel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction (0..1) of voxels with the same label in ``a`` and ``b`` (background included).

    Raises ValueError when the shapes differ or the maps are empty.
    """
    a, b = np.asarray(a), np.asarray(b)
    _check_shapes(a, b)
    if a.size == 0:
        raise ValueError("label maps are empty")
    equal = 0
    fa, fb = a.reshape(-1), b.reshape(-1)
    for start in range(0, fa.size, _CHUNK):
        equal += int(np.count_nonzero(fa[start:start + _CHUNK] == fb[start:start + _CHUNK]))
    return equal / a.size


def _confusion(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Joint label histogram: (values, counts) with counts[i, j] = #voxels where a == values[i] and b == values[j].

    One pass of np.bincount over the joint index a * n + b (chunked), not one mask per label.
    """
    top = int(max(a.max(initial=0), b.max(initial=0)))
    if top < _MAX_DENSE_LABEL:
        values = np.arange(top + 1)
        ia, ib = a.reshape(-1), b.reshape(-1)
    else:  # sparse, large label ids: remap to dense indices first
        values = np.union1d(np.unique(a), np.unique(b))
        ia = np.searchsorted(values, a.reshape(-1))
        ib = np.searchsorted(values, b.reshape(-1))
    n = len(values)
    counts = np.zeros(n * n, dtype=np.int64)
    for start in range(0, ia.size, _CHUNK):
        joint = ia[start:start + _CHUNK].astype(np.int64) * n + ib[start:start + _CHUNK]
        counts += np.bincount(joint, minlength=n * n)
    return values, counts.reshape(n, n)


def dice_per_class(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice = 2|A∩B| / (|A|+|B|) per label, for the labels present in ``a`` or ``b`` (0 excluded) or the given list.

    A label empty in both maps scores 1.0 (it can only happen for an explicitly requested label).
    Raises ValueError on shape mismatch or non-integer/negative labels.
    """
    a, b = _as_labels(a, "a"), _as_labels(b, "b")
    _check_shapes(a, b)
    values, counts = _confusion(a, b)
    size_a = counts.sum(axis=1)
    size_b = counts.sum(axis=0)
    inter = np.diagonal(counts)
    index = {int(v): i for i, v in enumerate(values)}
    if labels is None:
        wanted = [int(v) for v, sa, sb in zip(values, size_a, size_b, strict=True) if v != 0 and (sa or sb)]
    else:
        wanted = sorted({int(lab) for lab in labels})
    out: dict[int, float] = {}
    for lab in wanted:
        i = index.get(lab)
        if i is None or size_a[i] + size_b[i] == 0:
            out[lab] = 1.0
        else:
            out[lab] = float(2.0 * inter[i] / (size_a[i] + size_b[i]))
    return out


def class_voxel_counts(a: np.ndarray, include_background: bool = False) -> dict[int, int]:
    """Voxel count per label present in ``a`` (label 0 only with ``include_background``)."""
    arr = _as_labels(a, "a")
    if arr.size == 0:
        return {}
    flat = arr.reshape(-1)
    if int(arr.max()) < _MAX_DENSE_LABEL:
        counts = np.zeros(int(arr.max()) + 1, dtype=np.int64)
        for start in range(0, flat.size, _CHUNK):
            counts += np.bincount(flat[start:start + _CHUNK], minlength=counts.size)
        pairs = ((lab, int(c)) for lab, c in enumerate(counts) if c)
    else:
        values, cnt = np.unique(flat, return_counts=True)
        pairs = ((int(v), int(c)) for v, c in zip(values, cnt, strict=True))
    return {lab: c for lab, c in pairs if include_background or lab != 0}


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def dice_buckets(dices: Iterable[float]) -> dict[str, int]:
    """Count Dice values into ">0.95", "0.90-0.95" (0.90 ≤ d ≤ 0.95), "0.85-0.90" (0.85 ≤ d < 0.90), "<0.85".

    None/NaN values are ignored.
    """
    out = dict.fromkeys(DICE_BUCKETS, 0)
    for d in _finite(dices):
        if d > 0.95:
            out[">0.95"] += 1
        elif d >= 0.90:
            out["0.90-0.95"] += 1
        elif d >= 0.85:
            out["0.85-0.90"] += 1
        else:
            out["<0.85"] += 1
    return out


def quantile_key(q: float) -> str:
    """JSON key of quantile ``q`` (0..1): 0.1 -> "p10", 0.025 -> "p2.5"."""
    return f"p{q * 100:g}"


def quantiles(values: Iterable[float], qs: Iterable[float] = DEFAULT_QUANTILES) -> dict[str, float | None]:
    """Quantiles (linear interpolation) keyed "p10", "p25", ...; None for every key when no finite value is given."""
    vals = _finite(values)
    qs = tuple(qs)
    if not vals:
        return {quantile_key(q): None for q in qs}
    res = np.quantile(np.asarray(vals), qs)
    return {quantile_key(q): float(v) for q, v in zip(qs, res, strict=True)}


def latency_stats(seconds: Iterable[float]) -> dict[str, float | int | None]:
    """Latency statistics in seconds: n, mean, median, p95 (linear interpolation), min, max, std (sample, ddof=1;
    0.0 for one value). Every statistic is None when no finite value is given."""
    vals = _finite(seconds)
    if not vals:
        return {"n": 0, "mean": None, "median": None, "p95": None, "min": None, "max": None, "std": None}
    arr = np.asarray(vals)
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p95": float(np.quantile(arr, 0.95)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
    }


def label_name(label: int, names: Mapping[int, str] | None) -> str:
    """Name of ``label`` from ``names`` (int or str keys), else "label_<n>"."""
    if names:
        for key in (label, str(label)):
            if key in names:
                return str(names[key])
    return f"label_{label}"


def organ_difference(a_labels: Iterable[int], b_labels: Iterable[int], names: Mapping[int, str] | None) -> dict:
    """Compare the structures found in a reference (``a``) and another segmentation (``b``).

    Returns n_a, n_b, difference (n_b - n_a), missing (names in a, not in b) and extra (names in b, not in a),
    both sorted by label id. Background (0) is ignored.
    """
    sa = {int(x) for x in a_labels} - {0}
    sb = {int(x) for x in b_labels} - {0}
    return {
        "n_a": len(sa),
        "n_b": len(sb),
        "difference": len(sb) - len(sa),
        "missing": [label_name(lab, names) for lab in sorted(sa - sb)],
        "extra": [label_name(lab, names) for lab in sorted(sb - sa)],
    }
