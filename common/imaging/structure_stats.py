"""Per-structure figures of a label map over its own CT: voxels, volume, mean HU and whether the structure touches
the border, for every label present, in one pass over the arrays (numpy bincount).

Arrays are (x, y, z) on one voxel grid (the label map's and the CT's; the caller checks they share it); the voxel
volume is the product of the grid's spacings in mm, so volumes are mm³; intensities are the CT's values (HU).
"Touches the border" is the official statistics' rule (totalsegmentator.statistics.touches_border): a voxel within
``BORDER_VOXELS`` voxels of any face of the grid; the official fast statistics report 0 for such a structure.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

BORDER_VOXELS = 3  # totalsegmentator.statistics.touches_border: the first and last three planes of each axis


@dataclass(frozen=True)
class StructureFigures:
    """One structure of a label map: ``volume_mm3`` = voxels x voxel volume (mm³), ``mean_hu`` over its voxels."""

    label: int
    name: str
    voxels: int
    volume_mm3: float
    mean_hu: float
    touches_border: bool

    def to_dict(self) -> dict:
        return asdict(self)


def border_labels(labels: np.ndarray, band: int = BORDER_VOXELS) -> set[int]:
    """The non-zero labels with a voxel within ``band`` voxels of a face of the (x, y, z) array."""
    found: set[int] = set()
    for axis in range(labels.ndim):
        n = labels.shape[axis]
        for part in (slice(0, min(band, n)), slice(max(n - band, 0), n)):
            index = [slice(None)] * labels.ndim
            index[axis] = part
            found.update(int(v) for v in np.unique(labels[tuple(index)]))
    found.discard(0)
    return found


def structure_figures(labels: np.ndarray, ct: np.ndarray, spacing_mm: tuple[float, ...],
                      names: Mapping[int, str]) -> list[StructureFigures]:
    """The figures of every non-zero label present in ``labels`` (integer (x, y, z)) over ``ct`` (same shape, HU),
    in label order; ``spacing_mm`` (3,) gives the voxel volume. A label without a name in ``names`` is named
    ``label_<id>``."""
    if labels.shape[:3] != ct.shape[:3]:
        raise ValueError(f"label map {labels.shape} and CT {ct.shape} are not on one grid")
    flat = np.asarray(labels).reshape(-1).astype(np.int64, copy=False)
    counts = np.bincount(flat)
    sums = np.bincount(flat, weights=np.asarray(ct, dtype=np.float64).reshape(-1), minlength=len(counts))
    voxel_mm3 = float(np.prod(np.asarray(spacing_mm[:3], dtype=np.float64)))
    border = border_labels(np.asarray(labels))
    return [StructureFigures(label=int(k), name=names.get(int(k), f"label_{int(k)}"), voxels=int(counts[k]),
                             volume_mm3=float(counts[k]) * voxel_mm3, mean_hu=float(sums[k] / counts[k]),
                             touches_border=int(k) in border)
            for k in np.flatnonzero(counts) if k != 0]
