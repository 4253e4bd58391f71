"""Shared cases of the passport tests: an analytic ellipsoid rasterised on non-identity grids, its passport, and
the numbered scripts imported as modules."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from common.records.passport import Passport, build_passport, scan_metadata

ROOT = Path(__file__).resolve().parents[2]


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix Rz(az) @ Ry(ay) @ Rx(ax), angles in degrees."""
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


CENTRE_MM = np.array([12.3, -40.7, 85.2])
SEMI_AXES_MM = np.array([26.0, 16.0, 10.0])
ELLIPSOID_ROT = rotation(30.0, -20.0, 40.0)  # columns: world directions of the three semi-axes

GRIDS = {
    # name: (3x3 direction cosines (columns = voxel axes in world), spacing mm per voxel axis)
    "anisotropic_ras": (np.eye(3), np.array([0.8, 1.1, 2.0])),
    "lps": (np.diag([-1.0, -1.0, 1.0]), np.array([0.9, 0.9, 1.5])),
    "oblique": (rotation(15.0, -10.0, 25.0), np.array([1.0, 1.2, 1.5])),
}


def ellipsoid_volume(grid: str, label: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise the analytic ellipsoid on a grid; return (x, y, z) labels and the voxel->mm affine.

    The grid centre sits a fraction of a voxel away from the ellipsoid centre so nothing is symmetric.
    """
    directions, spacing = GRIDS[grid]
    lin = directions * spacing[None, :]
    radius = SEMI_AXES_MM.max() + 3 * spacing.max()
    shape = np.ceil(2 * radius / spacing).astype(int) + 1
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = CENTRE_MM - lin @ ((shape - 1) / 2 + np.array([0.31, -0.27, 0.43]))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ lin.T + affine[:3, 3]
    local = (world - CENTRE_MM) @ ELLIPSOID_ROT  # coordinates along the ellipsoid's own axes
    inside = (((local / SEMI_AXES_MM) ** 2).sum(axis=1) <= 1.0).reshape(shape)
    return np.where(inside, label, 0).astype(np.uint8), affine


def passport_for(labels, affine, tmp_path: Path, **kwargs) -> Passport:
    scan_file = tmp_path / "scan.nii.gz"
    img = nib.Nifti1Image(labels.astype(np.int16), affine)
    nib.save(img, scan_file)
    return build_passport(labels, affine, {7: "egg"}, scan=scan_metadata(scan_file, img),
                          model={"name": "test"}, resolution="original", **kwargs)


