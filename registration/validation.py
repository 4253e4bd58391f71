"""Deformable tier, the check: choose the spline smoothing and accept the spline only where it helps.

Both decisions use the registration's own correspondences and never the truth. The control cells are split
into ``cv_folds`` folds by spatial blocks (cubes of ``cv_block_mm``, fixed frame, world mm, each block to a
seeded random fold), so that a held-out cell's neighbours are mostly held out with it. For every candidate
smoothing lam (``smoothing`` x ``smoothing_factors``) and every fold, the spline is solved WITHOUT that fold's
matches (registration.spline_system, from the centroid-only field, so nothing of the fold leaks in) and the
fold's point-to-plane residual energy (mm^2, linearised) is taken at the predicted field: k-fold
cross-validation. The smoothing with the lowest held-out energy is chosen. The rigid result predicts a zero
field: its energy on the same held-out matches is the baseline. The spline is accepted when its held-out
energy is below (1 - ``accept_margin``) x the rigid one and it removes at least ``accept_min_gain_mm`` RMS of
held-out residual (so numerical noise never counts); otherwise the registration stays rigid (zero field).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from registration.spline_system import LinearisedData, SplineSystem


def block_folds(centres: np.ndarray, n_folds: int, block_mm: float, seed: int = 0) -> np.ndarray:
    """Fold id (n,) in 0..n_folds-1 of each (n, 3) cell centre (world mm): its cube of side ``block_mm``,
    cubes dealt out in a seeded random order, cycling through the folds (so folds have similar sizes)."""
    if not len(centres):
        return np.zeros(0, dtype=np.int64)
    key = np.floor((centres - centres.min(axis=0)) / max(float(block_mm), 1e-6)).astype(np.int64)
    _, block = np.unique(key, axis=0, return_inverse=True)
    block = np.asarray(block).ravel()
    order = np.random.default_rng(seed).permutation(int(block.max()) + 1)
    return (order[block] % max(int(n_folds), 1)).astype(np.int64)


@dataclass
class Validation:
    """The outcome (energies in mm^2 over all held-out matches; ``candidates`` ascending)."""

    candidates: list[float]
    cv_energy: list[float]
    rigid_energy: float
    chosen: float
    accepted: bool
    n_folds: int
    n_heldout_matches: int
    margin: float
    gain_mm: float = 0.0
    min_gain_mm: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def cv_over_rigid(self) -> float | None:
        """Held-out energy of the chosen smoothing over the rigid one (None when the rigid one is 0)."""
        best = self.cv_energy[self.candidates.index(self.chosen)]
        return best / self.rigid_energy if self.rigid_energy > 0 else None

    def to_dict(self) -> dict[str, Any]:
        n = max(self.n_heldout_matches, 1)
        return {
            "method": "k-fold cross-validation over control cells (spatial blocks): point-to-plane residual "
                      "energy of held-out matches, spline fitted without them, vs the rigid result (zero field)",
            "accepted": bool(self.accepted),
            "smoothing_chosen": float(self.chosen),
            "candidates": [float(c) for c in self.candidates],
            "cv_rms_mm": [float(np.sqrt(max(e, 0.0) / n)) for e in self.cv_energy],
            "rigid_rms_mm": float(np.sqrt(max(self.rigid_energy, 0.0) / n)),
            "cv_over_rigid": self.cv_over_rigid,
            "accept_if_cv_over_rigid_below": 1.0 - self.margin,
            "gain_rms_mm": float(self.gain_mm),
            "accept_if_gain_rms_mm_at_least": float(self.min_gain_mm),
            "n_folds": int(self.n_folds),
            "n_heldout_matches": int(self.n_heldout_matches),
            "notes": list(self.notes),
        }


def cross_validate(system: SplineSystem, data: LinearisedData, cell_fold: np.ndarray, candidates: list[float],
                   x0: np.ndarray, n_matches: np.ndarray, margin: float, min_gain_mm: float = 0.0,
                   rtol: float = 1e-3, precondition_with: float | None = None) -> Validation:
    """k-fold CV of the linearised problem ``data`` (nodes: the cells, then the centroids, which are never held
    out); ``cell_fold`` (n_cells,) fold ids, ``x0`` (M, 3) mm the centroid-only start, ``n_matches`` (n_cells,)
    accepted matches per cell; ``min_gain_mm``: the least RMS (mm) of held-out residual the spline must remove
    (sqrt((rigid - cv) / matches)); ``rtol`` and ``precondition_with``: SplineSystem.solve's. Returns the
    Validation (see the module docstring)."""
    cands = sorted({float(c) for c in candidates})
    n_cells = len(cell_fold)
    folds = [np.flatnonzero(cell_fold == f) for f in np.unique(cell_fold)]
    folds = [rows for rows in folds if n_matches[rows].sum() > 0]
    rigid = data.energy(np.zeros_like(data.Fm), np.arange(n_cells)) if n_cells else 0.0
    energies = []
    held_out = [data.without(rows) for rows in folds]
    start = np.broadcast_to(x0, (len(folds),) + x0.shape)
    for lam in cands:  # ascending; each starts from the previous one's held-out solutions (no fold sees its data)
        F, _ = system.solve(held_out, lam, start, rtol=rtol, precondition_with=precondition_with) if folds else \
            (np.zeros((0,) + data.Fm.shape), 0)
        energies.append(sum(data.energy(F[i], rows) for i, rows in enumerate(folds)))
        start = F
    notes = []
    if len(folds) < 2:
        notes.append("fewer than 2 folds with matches: no cross-validation, spline rejected")
    best = int(np.argmin(energies)) if energies and len(folds) >= 2 else len(cands) // 2
    n = max(int(n_matches.sum()), 1)
    gain_mm = float(np.sqrt(max(rigid - energies[best], 0.0) / n)) if energies else 0.0
    accepted = bool(len(folds) >= 2 and energies[best] < (1.0 - margin) * rigid and gain_mm >= min_gain_mm)
    return Validation(cands, energies, float(rigid), cands[best] if cands else 0.0, accepted, len(folds),
                      int(n_matches.sum()), float(margin), gain_mm, float(min_gain_mm), notes)
