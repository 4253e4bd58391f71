"""Synthetic passports for the registration tests: ellipsoid structures with exactly known geometry (no CT data
needed), and the same anatomy moved rigidly into another frame. World coordinates are mm, RAS+."""
from __future__ import annotations

import numpy as np

from common.records.passport_model import Structure
from registration.synthetic import ellipsoid_structure

NAMES = ["vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_T12", "sacrum", "hip_left", "hip_right",
         "rib_left_10", "rib_right_10", "liver", "spleen", "kidney_left", "kidney_right", "pancreas",
         "lung_lower_lobe_left", "lung_lower_lobe_right", "aorta", "stomach", "colon", "gallbladder"]


def make_passport(seed: int = 0, n_points: int = 300, names: list[str] = NAMES) -> list[Structure]:
    """A passport's structures (no scan behind them, so no Passport): ellipsoids with centroids, covariance
    eigen-decomposition (eigenvectors as columns, eigenvalues ascending), voxel counts and surface points, all
    in world mm."""
    rng = np.random.default_rng(seed)
    structures = []
    for i, name in enumerate(names):
        c = rng.uniform([-120, -100, -150], [120, 100, 150])
        radii = np.sort(rng.uniform(10, 50, size=3))
        Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        d = rng.normal(size=(n_points, 3))
        structures.append(ellipsoid_structure(i + 1, name, c, radii, Q, d,
                                              voxel_count=int(4 / 3 * np.pi * np.prod(radii) / 27)))
    return structures


def moved_passport(passport: list[Structure], R: np.ndarray, t: np.ndarray,
                   flip_signs: bool = True) -> list[Structure]:
    """The structures of the same anatomy in a MOVING frame where x_fixed = R x_moving + t (centroids,
    eigenvectors and boundary points moved; the other fields kept).

    Eigenvector signs are flipped at random (a passport's signs carry no meaning)."""
    rng = np.random.default_rng(123)
    out = []
    for s in passport:
        to_m = lambda p: (p - t) @ R  # noqa: E731 - fixed -> moving
        vecs = R.T @ s.eigenvectors
        if flip_signs:
            vecs = vecs * rng.choice([-1.0, 1.0], size=3)
        out.append(s.replace(centroid_mm=to_m(s.centroid_mm), eigenvectors=vecs,
                             boundary_points_mm=to_m(s.boundary_points_mm)))
    return out

