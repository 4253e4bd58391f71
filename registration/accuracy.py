"""Accuracy metrics of the harness: target registration error (TRE, mm), Dice, folding of the field.

TRE is measured in the MOVING scan, Learn2Reg style: for fixed points x (world mm, RAS+),
|T_est(x) - psi^-1(x)| with T_est the estimated FIXED -> MOVING mapping and psi the known truth, at
structure centroids, body points (HU > BODY_HU), points inside structures (labelled voxels whose 6
neighbours share the label) and points at structure boundaries (labelled voxels with a differently
labelled neighbour). Label maps and images are (x, y, z) arrays on the fixed grid.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from common.imaging.geometry import voxel_to_world
from common.records.metrics import dice_per_class
from registration.deformable import jacobian_stats
from registration.synthetic import KnownTransform
from registration.transform import DisplacementGrid, Transform

BODY_HU = -500.0


def sample_points(fixed_img: np.ndarray, fixed_labels: np.ndarray, affine: np.ndarray, n: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded evaluation points (world mm): body (HU > -500), inside structures, structure boundaries."""
    lab = fixed_labels.astype(np.int64, copy=False)
    same = np.ones(lab.shape, dtype=bool)
    for d in range(3):
        for shift in (1, -1):
            nb = np.roll(lab, shift, axis=d)
            edge = [slice(None)] * 3
            edge[d] = slice(0, 1) if shift == 1 else slice(-1, None)
            nb[tuple(edge)] = -1  # outside the volume counts as different
            same &= nb == lab
    sets = {
        "body": np.argwhere(fixed_img > BODY_HU),
        "inside": np.argwhere((lab > 0) & same),
        "boundary": np.argwhere((lab > 0) & ~same),
    }
    out = {}
    for key, idx in sets.items():
        if len(idx) > n:
            idx = idx[np.sort(rng.choice(len(idx), n, replace=False))]
        out[key] = voxel_to_world(idx, affine)
    return out


def tre_stats(err: np.ndarray) -> dict[str, float]:
    if not len(err):
        return {"n": 0, "mean": float("nan"), "p95": float("nan"), "max": float("nan")}
    return {"n": int(len(err)), "mean": float(err.mean()), "p95": float(np.percentile(err, 95)),
            "max": float(err.max())}


def tre_table(points: dict[str, np.ndarray], known: KnownTransform, estimates: dict[str, Transform]
              ) -> dict[str, dict[str, dict[str, float]]]:
    """{point set: {estimate: tre_stats}}: |T_est(x) - psi^-1(x)| (mm) at each set's (n, 3) fixed points x."""
    tre: dict[str, Any] = {}
    for key, x in points.items():
        truth = known.fixed_to_moving(x)
        tre[key] = {name: tre_stats(np.linalg.norm(est.fixed_to_moving(x) - truth, axis=1))
                    for name, est in estimates.items()}
    return tre


def tre_by_structure(points_mm: np.ndarray, labels: np.ndarray, affine: np.ndarray, names: dict[int, str],
                     known: KnownTransform, estimates: dict[str, Transform], worst: int = 8) -> list[dict[str, Any]]:
    """Where the error sits: mean TRE (mm) per structure over the (n, 3) fixed points (world mm, voxel centres of
    the (x, y, z) ``labels`` on ``affine``; label 0 is "background"), for each estimate; the ``worst`` structures
    by the last estimate's mean, worst first, each {"structure", "n", <estimate>: mean mm}."""
    if not len(points_mm):
        return []
    ijk = np.rint(np.linalg.solve(affine, np.c_[points_mm, np.ones(len(points_mm))].T)[:3].T).astype(np.int64)
    ijk = np.clip(ijk, 0, np.array(labels.shape) - 1)
    lab = labels[tuple(ijk.T)]
    truth = known.fixed_to_moving(points_mm)
    err = {k: np.linalg.norm(est.fixed_to_moving(points_mm) - truth, axis=1) for k, est in estimates.items()}
    last = list(estimates)[-1]
    rows = [{"structure": names.get(int(v), str(int(v))) if v else "background", "n": int(np.sum(lab == v)),
             **{k: float(e[lab == v].mean()) for k, e in err.items()}} for v in np.unique(lab)]
    return sorted(rows, key=lambda r: -r[last])[:worst]


def dice_scores(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean and median Dice over ``labels`` between label maps a and b (same grid); a label absent from both
    maps is left out (``n_labels`` counts the others). Per-label Dice: common.records.metrics.dice_per_class."""
    per_label = dice_per_class(a, b)  # the labels present in a or b
    sc = np.array([per_label[int(lab)] for lab in labels if int(lab) in per_label])
    return {"mean": float(sc.mean()) if sc.size else float("nan"),
            "median": float(np.median(sc)) if sc.size else float("nan"), "n_labels": int(sc.size)}


def folding_stats(grid: DisplacementGrid, body_points_mm: np.ndarray) -> dict[str, Any]:
    """jacobian_stats of the fixed -> moving field plus the fraction of (n, 3) body points (mm) where the
    trilinearly interpolated det(J) <= 0, and the grid shape."""
    js: dict[str, Any] = jacobian_stats(grid)
    det = grid.jacobian_determinant()
    det_body = ndimage.map_coordinates(det, grid.to_index(body_points_mm).T, order=1, mode="nearest")
    js["fraction_nonpositive_body_points"] = float(np.mean(det_body <= 0))
    js["grid_shape"] = list(grid.shape)
    return js


def _mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (jacobian_stats' "no such node"); None when there are none."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise_cases(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Average per-case statistics across cases (TRE mean/p95 averaged; max is the max)."""
    out: dict[str, Any] = {}
    for key in cases[0]["tre_mm"]:
        out[key] = {}
        for est in cases[0]["tre_mm"][key]:
            vals = [c["tre_mm"][key][est] for c in cases]
            out[key][est] = {"mean": float(np.mean([v["mean"] for v in vals])),
                             "p95": float(np.mean([v["p95"] for v in vals])),
                             "max": float(np.max([v["max"] for v in vals]))}
    res: dict[str, Any] = {"n_cases": len(cases), "tre_mm": out}
    body = out["body"]
    def ratio(tps: float, rigid: float) -> float | None:
        return tps / rigid if rigid > 1e-6 else None  # undefined for self-registration (0 / 0)

    res["tps_over_rigid_mean_tre_body"] = ratio(body["rigid_tps"]["mean"], body["rigid"]["mean"])
    res["tps_over_rigid_mean_tre_body_per_case"] = [
        ratio(c["tre_mm"]["body"]["rigid_tps"]["mean"], c["tre_mm"]["body"]["rigid"]["mean"]) for c in cases]
    res["time_ms"] = {"rigid_mean": float(np.mean([c["time_ms"]["rigid"] for c in cases])),
                      "tps_mean": float(np.mean([c["time_ms"]["tps"] for c in cases])),
                      "tps_max": float(np.max([c["time_ms"]["tps"] for c in cases]))}
    if "jacobian" in cases[0]:
        res["jacobian"] = {
            "fraction_nonpositive_grid_max": float(max(c["jacobian"]["fraction_nonpositive"] for c in cases)),
            "fraction_nonpositive_body_max": float(max(c["jacobian"]["fraction_nonpositive_body_points"]
                                                       for c in cases)),
            "log_det_std_mean": _mean_or_none([c["jacobian"]["log_det_std"] for c in cases]),
            "det_min": min((v for c in cases if (v := c["jacobian"]["det_min"]) is not None), default=None),
        }
    if "tps_accepted" in cases[0]:
        res["tps_accepted"] = [bool(c["tps_accepted"]) for c in cases]
        res["smoothing_used"] = [c.get("smoothing_used") for c in cases]
    if "dice" in cases[0]:
        res["dice_mean"] = {est: float(np.mean([c["dice"][est]["mean"] for c in cases])) for est in cases[0]["dice"]}
    return res
