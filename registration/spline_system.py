"""Deformable tier, solver side: the thin-plate spline on fixed control nodes, fitted to point-to-plane data.

Nodes and values are world mm (RAS+) in the FIXED frame; a value F_k (3,) is the displacement u at node k
(fixed x -> rigidly mapped moving point x + u(x)). The spline is the one scipy.interpolate.RBFInterpolator
builds (kernel r^2 log r, degree-1 polynomial): for node values F its bending energy is F^T Omega F, with
Omega the upper-left block of the inverse of [[K, P], [P^T, 0]].

The linearised matching problem of one ICP round (registration.correspondence.match_step) is

    min_F  sum_k (F_k - Fm_k)^T A_k (F_k - Fm_k) - 2 b_k^T (F_k - Fm_k)  +  lam * F^T Omega F

with A_k = sum n n^T and b_k = sum r n over the accepted matches of node k (unit normals n, point-to-plane
residuals r, mm). Unlike an isotropic spline fit of per-node targets, it leaves the directions no normal
constrains (sliding along a surface) to the bending energy instead of pinning them to the previous field.
It is solved by conjugate gradients (scipy.sparse.linalg.cg) preconditioned with the isotropic smoothing
spline (N + lam Omega)^-1, N = diag(point count of each node): both are LU factorisations (scipy.linalg)
made once per node set and smoothing value; Omega and the smoothers are then kept as explicit matrices. ``lam`` is in RBFInterpolator smoothing units per matched point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import lu_factor, lu_solve
from scipy.sparse.linalg import LinearOperator, cg
from scipy.spatial.distance import cdist

_EPS_SMOOTHING = 1e-6  # the "interpolating" system: tiny smoothing so that duplicate nodes stay solvable


def tps_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RBFInterpolator's thin_plate_spline kernel r^2 log r between (n, 3) and (m, 3) points (mm)."""
    r = cdist(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r > 0, r * r * np.log(np.where(r > 0, r, 1.0)), 0.0)


@dataclass
class LinearisedData:
    """One round's data per node: ``A`` (M, 3, 3), ``b`` (M, 3) mm, linearised at ``Fm`` (M, 3) mm; ``r2``
    (M,) the sum of squared residuals (mm^2) of each node's matches at ``Fm``."""

    A: np.ndarray
    b: np.ndarray
    Fm: np.ndarray
    r2: np.ndarray

    def energy(self, F: np.ndarray, rows: np.ndarray | None = None) -> float:
        """Point-to-plane residual energy (mm^2) of the rows' matches with node values ``F``, linearised."""
        sel = slice(None) if rows is None else rows
        d = F[sel] - self.Fm[sel]
        A, b = self.A[sel], self.b[sel]
        return float(np.einsum("ki,kij,kj->", d, A, d) - 2.0 * np.einsum("ki,ki->", b, d) + self.r2[sel].sum())

    def without(self, rows: np.ndarray) -> LinearisedData:
        """The same data with the ``rows`` (bool mask or indices) held out (no data there)."""
        A, b, r2 = self.A.copy(), self.b.copy(), self.r2.copy()
        A[rows], b[rows], r2[rows] = 0.0, 0.0, 0.0
        return LinearisedData(A, b, self.Fm, r2)


class SplineSystem:
    """Thin-plate spline on fixed ``nodes`` (M, 3) world mm with per-node weights ``counts`` (M,) > 0 (the
    preconditioner's N). Omega and the smoothing operators are explicit (M, M) matrices (one inverse each,
    cached per smoothing value): every later step is a matrix product."""

    def __init__(self, nodes: np.ndarray, counts: np.ndarray):
        self.nodes = np.asarray(nodes, dtype=np.float64)
        self.counts = np.maximum(np.asarray(counts, dtype=np.float64), 1e-12)
        m = len(self.nodes)
        self.K = tps_kernel(self.nodes, self.nodes)
        self.centre = self.nodes.mean(axis=0) if m else np.zeros(3)
        self.scale = max(float(np.ptp(self.nodes, axis=0).max()) if m else 1.0, 1e-6)
        self.P = self.polynomial(self.nodes)
        self._bend_lu = self._factor(np.full(m, _EPS_SMOOTHING))
        inv = lu_solve(self._bend_lu, np.eye(m + 4)[:, :m], check_finite=False)[:m]
        self.omega = (0.5 * (inv + inv.T)).astype(np.float32)  # products only: float32 halves their memory traffic
        self._smoothers: dict[float, np.ndarray] = {}

    def polynomial(self, x: np.ndarray) -> np.ndarray:
        """(n, 4) degree-1 polynomial basis at (n, 3) points mm (centred and scaled)."""
        return np.concatenate([np.ones((len(x), 1)), (x - self.centre) / self.scale], axis=1)

    def _factor(self, smoothing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = len(self.nodes)
        L = np.zeros((m + 4, m + 4))
        L[:m, :m] = self.K + np.diag(smoothing)
        L[:m, m:] = self.P
        L[m:, :m] = self.P.T
        return lu_factor(L, check_finite=False)

    def smoother(self, lam: float) -> np.ndarray:
        """(M, M) matrix S: S y are the node values of the smoothing spline of targets y with weights
        ``counts``, argmin sum_k counts_k |F_k - y_k|^2 + lam F^T Omega F (RBFInterpolator, smoothing
        lam / counts); S = (N + lam Omega)^-1 N."""
        key = float(lam)
        if key not in self._smoothers:
            m = len(self.nodes)
            if key <= 0:
                self._smoothers[key] = np.eye(m, dtype=np.float32)
            else:
                s = key / self.counts
                g = lu_solve(self._factor(s), np.eye(m + 4)[:, :m], check_finite=False)[:m]
                self._smoothers[key] = (np.eye(m) - s[:, None] * g).astype(np.float32)
        return self._smoothers[key]

    def solve(self, data: LinearisedData | list[LinearisedData], lam: float, x0: np.ndarray,
              rtol: float = 1e-4, maxiter: int = 200, precondition_with: float | None = None
              ) -> tuple[np.ndarray, int]:
        """Node values (M, 3) minimising the linearised problem (module docstring), or (k, M, 3) for a list of
        k problems solved together (one conjugate-gradient run on the stacked systems); (values, cg info).
        ``x0``: (M, 3) or (k, M, 3) start; ``precondition_with``: the smoothing of the preconditioner
        (default ``lam``; another value saves a factorisation and costs some iterations)."""
        many = isinstance(data, list)
        items = data if many else [data]
        m, k = len(self.nodes), len(items)
        A = np.stack([d.A for d in items])  # (k, M, 3, 3)
        S = self.smoother(lam if precondition_with is None else precondition_with)
        inv_n = 1.0 / self.counts[None, :, None]

        def across(mat: np.ndarray, X: np.ndarray) -> np.ndarray:  # mat (M, M) applied to each (M, 3) of (k, M, 3)
            flat = X.transpose(1, 0, 2).reshape(m, 3 * k).astype(np.float32)
            return (mat @ flat).astype(np.float64).reshape(m, k, 3).transpose(1, 0, 2)

        def matvec(v: np.ndarray) -> np.ndarray:
            X = v.reshape(k, m, 3)
            out = np.einsum("nkij,nkj->nki", A, X)
            if lam > 0:
                out += lam * across(self.omega, X)
            return out.ravel()

        def precond(v: np.ndarray) -> np.ndarray:
            return across(S, v.reshape(k, m, 3) * inv_n).ravel()

        rhs = np.stack([np.einsum("kij,kj->ki", d.A, d.Fm) + d.b for d in items]).ravel()
        start = np.broadcast_to(np.asarray(x0, dtype=np.float64), (k, m, 3)).ravel()
        op = LinearOperator((3 * m * k,) * 2, matvec=matvec, dtype=np.float64)
        pre = LinearOperator((3 * m * k,) * 2, matvec=precond, dtype=np.float64)
        x, info = cg(op, rhs, x0=start, rtol=rtol, maxiter=maxiter, M=pre)
        out = x.reshape(k, m, 3)
        return (out if many else out[0]), int(info)


class NodeSpline:
    """The spline through node values ``F`` (M, 3) mm of ``system`` (minimal bending energy): callable on
    (n, 3) world mm points, returning u (n, 3) mm."""

    def __init__(self, system: SplineSystem, F: np.ndarray, chunk: int = 4096):
        self.system = system
        rhs = np.concatenate([np.asarray(F, dtype=np.float64), np.zeros((4, 3))])
        sol = lu_solve(system._bend_lu, rhs, check_finite=False)
        self.weights, self.poly = sol[: len(system.nodes)], sol[len(system.nodes):]
        self.chunk = chunk

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, 3)
        out = np.empty((len(x), 3))
        for i in range(0, len(x), self.chunk):
            xs = x[i:i + self.chunk]
            out[i:i + self.chunk] = tps_kernel(xs, self.system.nodes) @ self.weights + \
                self.system.polynomial(xs) @ self.poly
        return out
