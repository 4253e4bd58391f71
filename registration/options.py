"""Registration options: every parameter that affects a result, as frozen dataclasses.

``dataclasses.asdict(options)`` is what registration.json and evaluate's JSON record; ``from_record`` (or
``Options(**record)``) rebuilds the same options from it, so a saved registration can be re-run exactly.
Lengths are millimetres (world RAS+), smoothing is in scipy RBFInterpolator units.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from registration.stability import WEIGHT_TABLE, WeightTable


def _known_fields(cls: type, record: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``record`` that are fields of ``cls`` (records also hold derived values)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in record.items() if k in names}


@dataclass(frozen=True)
class RigidOptions:
    """Tier 1 (registration.rigid.register_rigid). ``loss_scale_mm`` None means residual_threshold_mm / 2
    (resolved at construction, so the record holds the value used); ``weight_table`` is stored as nested
    tuples (group, weight, fnmatch patterns)."""

    residual_threshold_mm: float = 15.0
    use_axes: bool = True
    axis_weight: float = 0.5
    axis_min_gap: float = 0.25
    axis_max_angle_deg: float = 30.0
    loss: str = "cauchy"
    loss_scale_mm: float | None = None
    size_consistency: bool = True
    min_voxels: int = 8
    n_hypotheses: int = 200
    seed: int = 0
    max_iter: int = 20
    weight_table: WeightTable = WEIGHT_TABLE

    def __post_init__(self) -> None:
        if self.loss_scale_mm is None:
            object.__setattr__(self, "loss_scale_mm", self.residual_threshold_mm / 2.0)
        else:
            object.__setattr__(self, "loss_scale_mm", float(self.loss_scale_mm))
        table = tuple((str(g), float(w), tuple(str(p) for p in pats)) for g, w, pats in self.weight_table)
        object.__setattr__(self, "weight_table", table)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RigidOptions:
        """Options from a recorded settings dict (``asdict`` of options, plus derived keys, which are ignored)."""
        return cls(**_known_fields(cls, record))


@dataclass(frozen=True)
class DeformableOptions:
    """Tier 2 (registration.deformable.register_deformable); see that module for the meaning of each.

    ``centroid_smoothing`` None means ``smoothing`` (resolved at construction). ``bbox_mm``: optional
    ((xmin, ymin, zmin), (xmax, ymax, zmax)) fixed world mm the displacement grid must also cover (stored
    as nested tuples of floats). The smoothing used is chosen by cross-validation among ``smoothing`` x
    ``smoothing_factors`` (``(1.0,)``: ``smoothing`` as given) and, with ``validate``, the spline is kept only
    when it lowers the held-out residual by more than ``accept_margin`` (registration/validation.py).
    ValueError for an unknown ``mode``, a ``cell_mm`` that is not finite > 0, a factor that is not finite > 0
    or ``cv_folds`` < 2.
    """

    smoothing: float = 1e4
    centroid_smoothing: float | None = None
    centroid_radius_mm: float = 20.0
    max_control_points: int = 1000
    cell_mm: float = 10.0
    max_points_per_structure: int = 500
    max_surface_points: int = 20000
    min_points_per_structure: int = 4
    iterations: int = 5
    mode: str = "plane"
    mutual: bool = True
    symmetric: bool = False
    normal_neighbours: int = 12
    surface_neighbours: int = 8
    normal_damping: float = 0.1
    trust_damping: float = 1e-3
    smoothing_factors: tuple[float, ...] = (0.3, 1.0, 3.0)
    validate: bool = True
    cv_folds: int = 5
    cv_block_mm: float = 40.0
    accept_margin: float = 0.3
    accept_min_gain_mm: float = 0.05
    outlier_factor: float = 3.0
    outlier_floor_mm: float = 5.0
    max_structure_residual_mm: float = 60.0
    consistency_mm: float = 20.0
    exclude_rigid_outliers: bool = False
    grid_points: int = 24 ** 3
    grid_eval_step: int = 2
    margin_mm: float = 20.0
    bbox_mm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    min_voxels: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ("plane", "point"):
            raise ValueError(f"mode must be 'plane' or 'point', got {self.mode!r}")
        if not (np.isfinite(self.cell_mm) and self.cell_mm > 0):
            raise ValueError(f"cell_mm must be a finite number > 0, got {self.cell_mm!r}")
        factors = tuple(float(f) for f in self.smoothing_factors) or (1.0,)
        if not all(np.isfinite(f) and f > 0 for f in factors):
            raise ValueError(f"smoothing_factors must be finite numbers > 0, got {self.smoothing_factors!r}")
        object.__setattr__(self, "smoothing_factors", factors)
        if int(self.cv_folds) < 2:
            raise ValueError(f"cv_folds must be >= 2, got {self.cv_folds!r}")
        c_smooth = self.smoothing if self.centroid_smoothing is None else self.centroid_smoothing
        object.__setattr__(self, "centroid_smoothing", float(c_smooth))
        if self.bbox_mm is not None:
            b = np.asarray(self.bbox_mm, dtype=np.float64).reshape(2, 3)
            object.__setattr__(self, "bbox_mm", tuple(tuple(float(v) for v in row) for row in b))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> DeformableOptions:
        """Options from a recorded settings dict (``asdict`` of options, plus derived keys, which are ignored)."""
        return cls(**_known_fields(cls, record))


def with_overrides(cls: type, options: Any, overrides: Mapping[str, Any]) -> Any:
    """``options`` (an instance of ``cls``), or ``cls(**overrides)`` when None; TypeError when both are given
    (``dataclasses.replace`` would keep values resolved from the old ones, e.g. centroid_smoothing)."""
    if options is None:
        return cls(**overrides)
    if overrides:
        raise TypeError(f"pass a {cls.__name__} or keyword settings, not both ({', '.join(overrides)})")
    if not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    return options
