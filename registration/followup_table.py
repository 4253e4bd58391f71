"""The follow-up comparison, one row per structure: volume and mean HU in the baseline and the follow-up (each from
its own label map on its own grid, common.imaging.structure_stats), their change, and the registration's residual
at the structure, with the rows beyond the user's thresholds flagged.

Residuals are centroid distances in mm (world RAS+, in the baseline's frame): ``residual_rigid_mm`` is
registration.json's own rigid residual (|R c_followup + t - c_baseline|), ``residual_mm`` the same after the whole
transform (rigid and thin-plate spline: |T(c_followup) - c_baseline|, T = transform.moving_to_fixed), both from the
passports' centroids. Volumes are mL (voxels x voxel volume / 1000), HU the mean over the structure's voxels.
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.core.atomic import atomic_write_json, atomic_write_text
from common.imaging.structure_stats import StructureFigures, structure_figures
from common.records.passport import structure_by_name
from common.records.passport_model import Passport
from registration.followup import Prepared
from registration.transform import Transform

COLUMNS = ("structure", "volume_baseline_ml", "volume_followup_ml", "volume_change_pct", "mean_hu_baseline",
           "mean_hu_followup", "mean_hu_change", "residual_rigid_mm", "residual_mm", "rigid_outlier",
           "touches_border", "flagged")


@dataclass(frozen=True)
class Thresholds:
    """A row is flagged when |volume change| >= ``volume_pct`` % (or the structure is in one scan only), |mean HU
    change| >= ``hu`` HU, or the residual after registration >= ``residual_mm`` mm."""

    volume_pct: float = 10.0
    hu: float = 20.0
    residual_mm: float = 10.0


def figures_of(side: Prepared) -> dict[str, StructureFigures]:
    """Name -> figures of one scan's structures (its label map over its CT, on its grid)."""
    ct = np.asanyarray(side.volume.image.dataobj)
    return {f.name: f for f in structure_figures(side.labels, ct, side.volume.spacing, side.names)}


def _centroid_residuals(transform: Transform, fixed: Passport, moving: Passport) -> dict[str, float]:
    """|T(c_moving) - c_fixed| in mm per structure in both passports (T: the whole transform)."""
    f, m = structure_by_name(fixed), structure_by_name(moving)
    names = [n for n in f if n in m]
    if not names:
        return {}
    mapped = transform.moving_to_fixed(np.array([m[n].centroid_mm for n in names], dtype=np.float64))
    target = np.array([f[n].centroid_mm for n in names], dtype=np.float64)
    return {n: float(d) for n, d in zip(names, np.linalg.norm(mapped - target, axis=1), strict=True)}


def _flags(row: dict[str, Any], t: Thresholds) -> str:
    """Which thresholds the row is beyond ("volume", "HU", "residual", comma separated; "" for none)."""
    out = []
    change = row["volume_change_pct"]
    if (change is None) or abs(change) >= t.volume_pct:
        out.append("volume")
    if row["mean_hu_change"] is not None and abs(row["mean_hu_change"]) >= t.hu:
        out.append("HU")
    if row["residual_mm"] is not None and row["residual_mm"] >= t.residual_mm:
        out.append("residual")
    return ", ".join(out)


def comparison_rows(baseline: Prepared, followup: Prepared, report: dict[str, Any], transform: Transform,
                    thresholds: Thresholds) -> list[dict[str, Any]]:
    """One row per structure present in either scan (baseline order, then the follow-up's others); ``report`` is
    register.py's (registration.json), ``transform`` the one it saved."""
    from common.records.passport import load_passport

    b, f = figures_of(baseline), figures_of(followup)
    rigid = report["rigid"]["residuals_mm"]
    outliers = set(report["rigid"]["outliers"])
    after = _centroid_residuals(transform, load_passport(baseline.passport), load_passport(followup.passport))
    rows = []
    for name in [*b, *(n for n in f if n not in b)]:
        fb, ff = b.get(name), f.get(name)
        vb = fb.volume_mm3 / 1000.0 if fb else 0.0
        vf = ff.volume_mm3 / 1000.0 if ff else 0.0
        border = [side for side, fig in (("baseline", fb), ("follow-up", ff)) if fig is not None and fig.touches_border]
        row = {"structure": name, "volume_baseline_ml": vb, "volume_followup_ml": vf,
               "volume_change_pct": (vf - vb) / vb * 100.0 if fb and ff else None,
               "mean_hu_baseline": fb.mean_hu if fb else None, "mean_hu_followup": ff.mean_hu if ff else None,
               "mean_hu_change": ff.mean_hu - fb.mean_hu if fb and ff else None,
               "residual_rigid_mm": rigid.get(name), "residual_mm": after.get(name),
               "rigid_outlier": name in outliers, "touches_border": ", ".join(border)}
        row["flagged"] = _flags(row, thresholds)
        rows.append(row)
    return rows


def reflag(rows: list[dict[str, Any]], thresholds: Thresholds) -> list[dict[str, Any]]:
    """The rows flagged anew for other ``thresholds`` (copies; the figures are unchanged)."""
    return [{**row, "flagged": _flags(row, thresholds)} for row in rows]


def comparison_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text (COLUMNS; empty cells for missing values)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    return buf.getvalue()


def write_comparison(rows: list[dict[str, Any]], folder: Path, thresholds: Thresholds, baseline: Prepared,
                     followup: Prepared, report: dict[str, Any]) -> tuple[Path, Path]:
    """comparison.csv and comparison.json (rows, thresholds, both inputs and the registration's outputs) in
    ``folder``, atomically."""
    doc = {"units": {"volume": "mL", "mean_hu": "HU", "residual": "mm (baseline world frame, RAS+)"},
           "thresholds": asdict(thresholds),
           "baseline": {"scan": str(baseline.choice.scan), "segmentation": baseline.source},
           "followup": {"scan": str(followup.choice.scan), "segmentation": followup.source},
           "registration": report.get("outputs", {}), "rows": rows}
    return (atomic_write_text(folder / "comparison.csv", comparison_csv(rows)),
            atomic_write_json(folder / "comparison.json", doc))
