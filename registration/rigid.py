"""Tier 1: rigid registration of two anatomical passports.

The estimate maps MOVING world mm (RAS+) -> FIXED world mm (RAS+):  x_fixed = R @ x_moving + t.

Landmarks are the centroids of the structures present in both passports (matched by name),
optionally plus two points per well-defined principal axis (centroid +- L * eigenvector, with the
eigenvector's sign chosen to agree with the centroid-only estimate). Each landmark carries the
structure's anatomical stability weight (registration/stability.py) times a size-consistency factor.

Robustness: RANSAC-style hypotheses from triples of centroids (MSAC score, residual threshold in
mm), then iterative re-estimation on the inliers with Cauchy (or Huber) weights; structures whose
centroid residual exceeds the threshold are reported as outliers and do not influence the result.

The weighted Kabsch/Procrustes solution is written by hand here: SimpleITK's landmark initializer
ignores landmark weights for rigid transforms, and the closed form is a 3x3 SVD (sub-millisecond numpy).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from common.records.passport_model import Structure
from registration.options import RigidOptions, with_overrides
from registration.stability import structure_weight, weight_group
from registration.structures import Structures, centroid, eigen, matched_names, structure_table


def weighted_kabsch(moving: np.ndarray, fixed: np.ndarray, weights: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares rigid transform with ``fixed ~= R @ moving + t``.

    ``moving`` and ``fixed`` are (n, 3) corresponding points (world mm) or batches (h, n, 3);
    ``weights`` (n,) or (h, n), non-negative. Returns R (3, 3) [or (h, 3, 3)], a proper rotation
    (det +1), and t (3,) [or (h, 3)] in mm. With fewer than 3 points of positive weight the rotation
    is the identity and only the weighted mean translation is estimated.
    """
    P = np.asarray(moving, dtype=np.float64)
    Q = np.asarray(fixed, dtype=np.float64)
    single = P.ndim == 2
    if single:
        P, Q = P[None], Q[None]
    w = np.ones(P.shape[:2]) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), P.shape[:2])
    wsum = w.sum(axis=1, keepdims=True)
    wsum = np.where(wsum > 0, wsum, 1.0)
    wn = w / wsum
    pc = np.einsum("hn,hnd->hd", wn, P)
    qc = np.einsum("hn,hnd->hd", wn, Q)
    H = np.einsum("hn,hni,hnj->hij", wn, P - pc[:, None], Q - qc[:, None])
    U, _S, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(np.swapaxes(Vt, 1, 2) @ np.swapaxes(U, 1, 2)))
    d[d == 0] = 1.0
    D = np.tile(np.eye(3), (len(H), 1, 1))
    D[:, 2, 2] = d
    R = np.swapaxes(Vt, 1, 2) @ D @ np.swapaxes(U, 1, 2)
    too_few = (w > 0).sum(axis=1) < 3
    R[too_few] = np.eye(3)
    t = qc - np.einsum("hij,hj->hi", R, pc)
    return (R[0], t[0]) if single else (R, t)


def rotation_angle_deg(R: np.ndarray) -> float:
    """Rotation angle of a 3x3 rotation matrix in degrees."""
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


@dataclass
class RigidResult:
    """Rigid transform mapping MOVING world mm (RAS+) -> FIXED world mm: x_f = rotation @ x_m + translation.

    ``residuals_mm``: per matched structure, |R c_moving + t - c_fixed| of the centroids (mm).
    ``outliers``: structures whose residual exceeded the threshold (ignored by the estimate).
    ``weights``: the base weight used per structure (stability table x size consistency).
    ``time_ms``: wall time of the estimate (matching + fitting) in milliseconds.
    """

    rotation: np.ndarray
    translation: np.ndarray
    residuals_mm: dict[str, float]
    outliers: list[str]
    weights: dict[str, float]
    n_axis_points: int = 0
    iterations: int = 0
    time_ms: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def matched(self) -> list[str]:
        """Names of the structures present in both passports (order of the fixed passport)."""
        return list(self.residuals_mm)

    @property
    def inliers(self) -> list[str]:
        out = set(self.outliers)
        return [n for n in self.residuals_mm if n not in out]

    @property
    def matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix, moving world mm -> fixed world mm."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation
        return m

    def apply(self, points_moving_mm: np.ndarray) -> np.ndarray:
        """Map (n, 3) moving world mm points to fixed world mm."""
        return np.asarray(points_moving_mm, dtype=np.float64) @ self.rotation.T + self.translation

    def apply_inverse(self, points_fixed_mm: np.ndarray) -> np.ndarray:
        """Map (n, 3) fixed world mm points to moving world mm."""
        return (np.asarray(points_fixed_mm, dtype=np.float64) - self.translation) @ self.rotation

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (mm, degrees, ms)."""
        res = np.array(list(self.residuals_mm.values())) if self.residuals_mm else np.zeros(0)
        inl = np.array([self.residuals_mm[n] for n in self.inliers]) if self.inliers else np.zeros(0)
        return {
            "direction": "moving world mm -> fixed world mm (RAS+): x_f = R x_m + t",
            "rotation": self.rotation.tolist(),
            "translation_mm": self.translation.tolist(),
            "rotation_angle_deg": rotation_angle_deg(self.rotation),
            "n_matched": len(self.residuals_mm),
            "n_outliers": len(self.outliers),
            "outliers": list(self.outliers),
            "n_axis_points": int(self.n_axis_points),
            "iterations": int(self.iterations),
            "residual_mm_mean_inliers": float(inl.mean()) if inl.size else None,
            "residual_mm_max_inliers": float(inl.max()) if inl.size else None,
            "residual_mm_mean_all": float(res.mean()) if res.size else None,
            "residuals_mm": {k: float(v) for k, v in self.residuals_mm.items()},
            "weights": {k: float(v) for k, v in self.weights.items()},
            "time_ms": float(self.time_ms),
            "settings": dict(self.settings),
        }


def _robust_weights(r: np.ndarray, scale: float, loss: str) -> np.ndarray:
    """IRLS weights psi(r)/r for residuals r (mm)."""
    if loss == "none" or scale <= 0:
        return np.ones_like(r)
    if loss == "cauchy":
        return 1.0 / (1.0 + (r / scale) ** 2)
    if loss == "huber":
        return np.where(r <= scale, 1.0, scale / np.maximum(r, 1e-12))
    raise ValueError(f"unknown robust loss {loss!r} (cauchy, huber, none)")


def _residuals(R: np.ndarray, t: np.ndarray, P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    return np.linalg.norm(P @ R.T + t - Q, axis=-1)


def _ransac(P: np.ndarray, Q: np.ndarray, w: np.ndarray, threshold: float, n_hypotheses: int,
            seed: int) -> np.ndarray:
    """Inlier mask of the best MSAC hypothesis from triples of correspondences (deterministic)."""
    n = len(P)
    n_all = n * (n - 1) * (n - 2) // 6
    if n_all <= n_hypotheses:
        triples = np.array(list(combinations(range(n), 3)), dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        triples = np.argpartition(rng.random((n_hypotheses, n)), 3, axis=1)[:, :3]
    Rs, ts = weighted_kabsch(P[triples], Q[triples])
    r = np.linalg.norm(np.matmul(P[None], np.swapaxes(Rs, 1, 2)) + ts[:, None] - Q[None], axis=-1)
    cost = (np.minimum(r, threshold) ** 2 * w[None]).sum(axis=1)
    return r[int(np.argmin(cost))] < threshold


def _axis_points(cf: np.ndarray, cm: np.ndarray, eig_f: tuple[np.ndarray, np.ndarray],
                 eig_m: tuple[np.ndarray, np.ndarray], R: np.ndarray, min_gap: float,
                 max_angle_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Extra correspondences along well-defined principal axes (vectorised over structures).

    ``cf``/``cm`` (n, 3) centroids, ``eig_*`` = (eigenvalues (n, 3), eigenvectors (n, 3, 3) as columns).
    Axis k of a structure is used when its eigenvalue's relative gap to the other two is >= ``min_gap`` in
    both passports and, after choosing the moving eigenvector's sign so that R @ v_moving agrees with v_fixed,
    the two agree within ``max_angle_deg``. Points: c +- L v, L = mean sqrt(eigenvalue) of the two passports
    (the same length on both sides: a rigid map cannot scale).
    Returns (moving points, fixed points, index of the owning structure).
    """
    lf, vf = eig_f
    lm, vm = eig_m

    def gap_ok(vals: np.ndarray) -> np.ndarray:
        out = np.zeros(vals.shape, dtype=bool)
        for k in range(3):
            others = vals[:, [j for j in range(3) if j != k]]
            gap = np.abs(vals[:, k:k + 1] - others).min(axis=1)
            out[:, k] = (vals[:, k] > 0) & (gap >= min_gap * vals.max(axis=1))
        return out

    ok = gap_ok(lf) & gap_ok(lm)
    cos = np.einsum("ij,njk,nik->nk", R, vm, vf)  # (R v_m_k) . v_f_k for each structure n, axis k
    ok &= np.abs(cos) >= np.cos(np.radians(max_angle_deg))
    sgn = np.where(cos >= 0, 1.0, -1.0)
    L = 0.5 * (np.sqrt(np.maximum(lf, 0)) + np.sqrt(np.maximum(lm, 0)))
    idx_n, idx_k = np.nonzero(ok)
    if not len(idx_n):
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, dtype=np.int64)
    a_f = vf[idx_n, :, idx_k] * L[idx_n, idx_k][:, None]
    a_m = vm[idx_n, :, idx_k] * (L[idx_n, idx_k] * sgn[idx_n, idx_k])[:, None]
    fix = np.concatenate([cf[idx_n] + a_f, cf[idx_n] - a_f])
    mov = np.concatenate([cm[idx_n] + a_m, cm[idx_n] - a_m])
    return mov, fix, np.concatenate([idx_n, idx_n])


def register_rigid(fixed: Structures, moving: Structures, options: RigidOptions | None = None,
                   **overrides: Any) -> RigidResult:
    """Rigid registration from two passports; the result maps MOVING world mm -> FIXED world mm.

    ``fixed``/``moving``: passports (Passport, or a sequence of Structure). ``options`` (default
    RigidOptions(), or RigidOptions(**overrides) from keyword settings): structures are matched by name;
    those with fewer than ``min_voxels`` voxels are ignored. ``residual_threshold_mm``: a structure whose
    centroid residual exceeds it is an outlier. ``loss``: "cauchy" | "huber" | "none", IRLS weights with scale
    ``loss_scale_mm``. ``use_axes`` adds principal-axis points (weight ``axis_weight`` x the structure's
    weight). The result's ``settings`` are ``asdict(options)`` plus each structure's stability group.
    Raises ValueError when no structure matches.
    """
    t0 = time.perf_counter()
    opts = with_overrides(RigidOptions, options, overrides)
    marks = _landmarks(fixed, moving, opts)
    R, t, n_axis_points, iterations = _estimate(marks, opts)
    return _result(marks, opts, R, t, n_axis_points, iterations, t0)


@dataclass
class _Landmarks:
    """The structures matched by name, in ``names`` order: centroids ``moving``/``fixed`` (n, 3) world mm (RAS+),
    base weights (n,) (stability table x size consistency, at least 1e-6) and stability groups."""

    names: list[str]
    moving: np.ndarray
    fixed: np.ndarray
    weights: np.ndarray
    groups: list[str]
    fixed_table: dict[str, Structure]
    moving_table: dict[str, Structure]


def _landmarks(fixed: Structures, moving: Structures, opts: RigidOptions) -> _Landmarks:
    """The matched structures' centroids and weights; ValueError when the passports share no structure."""
    weight_table = opts.weight_table
    fixed_t = structure_table(fixed, opts.min_voxels)
    moving_t = structure_table(moving, opts.min_voxels)
    names = matched_names(fixed_t, moving_t)
    if not names:
        raise ValueError("the two passports share no structure name: nothing to register")
    P = np.array([centroid(moving_t[n]) for n in names])
    Q = np.array([centroid(fixed_t[n]) for n in names])
    groups = [weight_group(n, weight_table) for n in names]
    w = np.array([structure_weight(n, weight_table) for n in names])
    if opts.size_consistency:
        sf = np.array([fixed_t[n].volume_mm3 for n in names])
        sm = np.array([moving_t[n].volume_mm3 for n in names])
        c = np.where((sf > 0) & (sm > 0), np.minimum(sf, sm) / np.maximum(np.maximum(sf, sm), 1e-12), 1.0)
        w = w * np.nan_to_num(c, nan=1.0)
    w = np.maximum(w, 1e-6)
    return _Landmarks(names, P, Q, w, groups, fixed_t, moving_t)


class _WeightedFit:
    """The weighted Kabsch fit of the centroids plus the current principal-axis points (world mm), with IRLS
    weights from the previous residuals. ``axis_moving``/``axis_fixed`` (m, 3) mm and ``owner`` (m,) (index
    of the structure each axis point belongs to) start empty; the axes stage sets them."""

    def __init__(self, marks: _Landmarks, opts: RigidOptions):
        self.P, self.Q, self.w = marks.moving, marks.fixed, marks.weights
        self.scale, self.loss, self.axis_weight = opts.loss_scale_mm, opts.loss, opts.axis_weight
        self.axis_moving = np.zeros((0, 3))
        self.axis_fixed = np.zeros((0, 3))
        self.owner = np.zeros(0, dtype=np.int64)

    def __call__(self, inl: np.ndarray, r_c: np.ndarray | None, r_a: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(R, t) from the inlier mask (n,) and the centroid / axis-point residuals in mm (None: no IRLS)."""
        w, scale, loss, Pa = self.w, self.scale, self.loss, self.axis_moving
        wc = w * inl * (1.0 if r_c is None else _robust_weights(r_c, scale, loss))
        pts_m, pts_f, ww = [self.P], [self.Q], [wc]
        if len(Pa):
            owner = self.owner
            wa = self.axis_weight * w[owner] * inl[owner] * (1.0 if r_a is None else _robust_weights(r_a, scale, loss))
            pts_m.append(Pa)
            pts_f.append(self.axis_fixed)
            ww.append(wa)
        return weighted_kabsch(np.concatenate(pts_m), np.concatenate(pts_f), np.concatenate(ww))


def _refine(fit: _WeightedFit, R: np.ndarray, t: np.ndarray, inl: np.ndarray, threshold_mm: float,
            max_iter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One stage of outlier rejection and re-fitting, up to ``max_iter`` rounds, until the inliers (centroid
    residual < ``threshold_mm``, at least the best three) and the transform settle. Returns (R, t, inliers,
    rounds run)."""
    P, Q, Pa, Qa = fit.P, fit.Q, fit.axis_moving, fit.axis_fixed
    n = len(P)
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        r_c = _residuals(R, t, P, Q)
        r_a = _residuals(R, t, Pa, Qa) if len(Pa) else None
        new_inl = r_c < threshold_mm
        if new_inl.sum() < min(3, n):  # never drop below a solvable set: keep the best three
            new_inl = np.zeros(n, dtype=bool)
            new_inl[np.argsort(r_c)[: min(3, n)]] = True
        R_new, t_new = fit(new_inl, r_c, r_a)
        change = np.abs(R_new - R).max() + np.abs(t_new - t).max() / 100.0
        R, t, inl_changed = R_new, t_new, bool(np.any(new_inl != inl))
        inl = new_inl
        if not inl_changed and change < 1e-10:
            break
    return R, t, inl, iterations


def _estimate(marks: _Landmarks, opts: RigidOptions) -> tuple[np.ndarray, np.ndarray, int, int]:
    """RANSAC inliers, a first fit, the centroid stage, then (``use_axes``) the stage with axis points.
    Returns (R (3, 3), t (3,) mm, number of axis points, rounds run)."""
    P, Q, w, names = marks.moving, marks.fixed, marks.weights, marks.names
    threshold, n = opts.residual_threshold_mm, len(names)
    inl = np.ones(n, dtype=bool) if n < 4 else _ransac(P, Q, w, threshold, opts.n_hypotheses, opts.seed)
    if inl.sum() < min(3, n):
        inl = np.ones(n, dtype=bool)
    fit = _WeightedFit(marks, opts)
    R, t = fit(inl, None, None)
    if opts.use_axes:
        eig_f = eigen([marks.fixed_table[nm] for nm in names])
        eig_m = eigen([marks.moving_table[nm] for nm in names])
    R, t, inl, iterations = _refine(fit, R, t, inl, threshold, opts.max_iter)
    if opts.use_axes:
        fit.axis_moving, fit.axis_fixed, fit.owner = _axis_points(Q, P, eig_f, eig_m, R, opts.axis_min_gap,
                                                                  opts.axis_max_angle_deg)
        if len(fit.axis_moving):
            R, t, inl, more = _refine(fit, R, t, inl, threshold, opts.max_iter)
            iterations += more
    return R, t, int(len(fit.axis_moving)), iterations


def _result(marks: _Landmarks, opts: RigidOptions, R: np.ndarray, t: np.ndarray, n_axis_points: int,
            iterations: int, t0: float) -> RigidResult:
    """The RigidResult of the estimate: centroid residuals (mm), outliers, weights; time since ``t0``
    (time.perf_counter seconds) in ms."""
    names, n = marks.names, len(marks.names)
    r_c = _residuals(R, t, marks.moving, marks.fixed)
    outliers = [names[i] for i in range(n) if r_c[i] >= opts.residual_threshold_mm]
    elapsed = (time.perf_counter() - t0) * 1000.0
    return RigidResult(
        rotation=R, translation=t,
        residuals_mm={names[i]: float(r_c[i]) for i in range(n)},
        outliers=outliers,
        weights={names[i]: float(marks.weights[i]) for i in range(n)},
        n_axis_points=n_axis_points,
        iterations=iterations,
        time_ms=elapsed,
        settings={
            **asdict(opts),
            "groups": dict(zip(names, marks.groups, strict=True)),
        },
    )
