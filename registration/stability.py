"""Anatomical stability weights for rigid registration, in ONE configurable table.

A structure's weight says how much its centroid (and principal axes) should pull on the rigid
(Tier 1) estimate: bones of the axial skeleton barely move relative to each other between two scans
of one patient, ribs move with breathing, solid organs slide a few cm, lungs and bowel change shape.

The table is an ordered list of (group, weight, fnmatch patterns on TotalSegmentator class names);
the FIRST group with a matching pattern wins; names matching nothing get ``DEFAULT_WEIGHT``.
To change the weighting, edit ``WEIGHT_TABLE`` or pass another table to the functions below.
"""
from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from functools import lru_cache

WeightTable = Sequence[tuple[str, float, tuple[str, ...]]]

DEFAULT_GROUP = "other"
DEFAULT_WEIGHT = 0.5

WEIGHT_TABLE: WeightTable = (
    # group                weight  class-name patterns (fnmatch, case-sensitive, first match wins)
    ("axial_skeleton",     1.0,    ("vertebrae_*", "sacrum", "hip_*", "skull")),
    ("spinal_canal",       0.9,    ("spinal_cord",)),
    ("ribcage",            0.9,    ("rib_*", "sternum")),
    ("cartilage",          0.8,    ("costal_cartilages",)),
    ("paraspinal_muscle",  0.7,    ("autochthon_*", "iliopsoas_*", "gluteus_*")),
    ("great_vessel",       0.7,    ("aorta",)),
    ("solid_organ",        0.6,    ("liver", "spleen", "kidney_*", "pancreas", "adrenal_gland_*", "heart",
                                    "brain", "thyroid_gland", "prostate", "kidney_cyst_*")),
    ("airway",             0.6,    ("trachea",)),
    ("limb_bone",          0.5,    ("femur_*", "humerus_*", "scapula_*", "clavicula_*")),
    ("lung",               0.4,    ("lung_*",)),
    ("hollow_organ",       0.3,    ("stomach", "small_bowel", "duodenum", "colon", "urinary_bladder",
                                    "esophagus", "gallbladder")),
)


@lru_cache(maxsize=4096)
def _lookup(name: str, table: WeightTable, default: float) -> tuple[str, float]:
    for group, weight, patterns in table:
        if any(fnmatchcase(name, p) for p in patterns):
            return group, float(weight)
    return DEFAULT_GROUP, float(default)


def _hashable(table: WeightTable) -> tuple:
    return table if isinstance(table, tuple) else tuple((g, float(w), tuple(p)) for g, w, p in table)


def weight_group(name: str, table: WeightTable = WEIGHT_TABLE) -> str:
    """Group of a structure name in ``table`` ("other" when no pattern matches)."""
    return _lookup(name, _hashable(table), DEFAULT_WEIGHT)[0]


def structure_weight(name: str, table: WeightTable = WEIGHT_TABLE, default: float = DEFAULT_WEIGHT) -> float:
    """Stability weight (dimensionless, 0..1) of a structure name; ``default`` when no pattern matches."""
    return _lookup(name, _hashable(table), float(default))[1]
