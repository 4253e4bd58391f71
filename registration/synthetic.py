"""Synthetic truth for the accuracy harness: known transforms of a real CT and the moving scan they make.

The truth psi maps MOVING world mm -> FIXED world mm (RAS+): a rigid part (rotation about the scan centre,
shift) plus a few Gaussian bumps in the fixed frame. The moving scan and label map are the fixed ones pulled
through psi onto a moving grid covering the transformed field of view (same voxel size and axes as the
fixed grid; arrays (x, y, z)): the image trilinearly, the labels from a smooth anatomy model (each label's
indicator blurred by ``label_sigma_vox`` voxels, cubic samples, argmax with background). A plain
nearest-neighbour warp of a 3 mm label map rounds nearly translational shifts to whole voxels and biased
centroids by up to 1.5 mm per axis (measured: rigid TRE 1.66 mm instead of 0.31 mm for a 0.25 deg case).
``synthetic_structures`` makes passport structures (ellipsoids) for timing a full-size passport.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.imaging.geometry import grid_world, voxel_to_world, world_to_voxel
from common.records.passport_model import Box, Structure


def rotation_matrix(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotation about unit ``axis`` by ``angle_deg`` degrees (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    th = np.radians(angle_deg)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * K @ K


@dataclass
class KnownTransform:
    """Truth mapping psi: MOVING world mm -> FIXED world mm (RAS+).

    psi(y) = z + D(z) with z = R y + t (rigid) and D(z) = sum_k a_k exp(-|z - c_k|^2 / (2 s_k^2)) + f(z):
    Gaussian bumps in the fixed frame (centres c_k mm, amplitude vectors a_k mm, widths s_k mm) plus an
    optional ``field`` f (a callable (n, 3) mm -> (n, 3) mm, e.g. registration.breathing.BreathingField).
    """

    rotation: np.ndarray
    translation: np.ndarray
    centers: np.ndarray
    amplitudes: np.ndarray
    sigmas: np.ndarray
    field: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def identity(cls) -> KnownTransform:
        return cls(np.eye(3), np.zeros(3), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))

    @property
    def deformed(self) -> bool:
        """Whether D is not identically zero (bumps or a field)."""
        return bool(len(self.sigmas)) or self.field is not None

    def deformation(self, z: np.ndarray) -> np.ndarray:
        """D(z) (n, 3) mm: the bumps plus the field, at fixed-frame points z (n, 3) mm."""
        out = self.bumps(z)
        return out + self.field(np.asarray(z, dtype=np.float64).reshape(-1, 3)) if self.field is not None else out

    def jacobian(self, z: np.ndarray, h_mm: float = 0.25) -> np.ndarray:
        """(n, 3, 3) I + grad D at fixed-frame points z (n, 3) mm, central differences of step ``h_mm``."""
        z = np.asarray(z, dtype=np.float64).reshape(-1, 3)
        J = np.tile(np.eye(3), (len(z), 1, 1))
        for d in range(3):
            e = np.zeros(3)
            e[d] = h_mm
            J[:, :, d] += (self.deformation(z + e) - self.deformation(z - e)) / (2.0 * h_mm)
        return J

    def bumps(self, z: np.ndarray) -> np.ndarray:
        """D(z) (n, 3) mm for fixed-frame points z (n, 3) mm (computed in chunks)."""
        z = np.asarray(z, dtype=np.float64).reshape(-1, 3)
        out = np.zeros_like(z)
        for k in range(len(self.sigmas)):
            d2 = np.sum((z - self.centers[k]) ** 2, axis=1)
            out += np.exp(-d2 / (2.0 * self.sigmas[k] ** 2))[:, None] * self.amplitudes[k]
        return out

    def moving_to_fixed(self, y: np.ndarray) -> np.ndarray:
        z = np.asarray(y, dtype=np.float64).reshape(-1, 3) @ self.rotation.T + self.translation
        return z + self.deformation(z)

    def fixed_to_moving(self, x: np.ndarray, tol_mm: float = 1e-6, max_iter: int = 200) -> np.ndarray:
        """psi^-1: bumps only by fixed-point iteration z <- x - D(z) (converges: max |grad D| < 1); with a
        field (whose shear may exceed 1) by Newton steps z <- z - J(z)^-1 (z + D(z) - x)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, 3)
        z = x.copy()
        for _ in range(max_iter if self.field is None else 0):
            z_new = x - self.bumps(z)
            done = np.abs(z_new - z).max() < tol_mm if len(z) else True
            z = z_new
            if done:
                break
        for _ in range(max_iter if self.field is not None else 0):
            g = z + self.deformation(z) - x
            todo = np.abs(g).max(axis=1) >= tol_mm
            if not todo.any():
                break
            z[todo] -= np.linalg.solve(self.jacobian(z[todo]), g[todo][..., None])[..., 0]
        return (z - self.translation) @ self.rotation

    def max_gradient(self, points: np.ndarray) -> float:
        """Largest spectral norm of grad D over ``points`` (must stay < 1 for an invertible truth of bumps;
        a field's shear may exceed it, see ``det_min``)."""
        z = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if self.field is not None:
            G = self.jacobian(z) - np.eye(3)
            return float(np.linalg.norm(G, ord=2, axis=(1, 2)).max()) if len(z) else 0.0
        G = np.zeros((len(z), 3, 3))
        for k in range(len(self.sigmas)):
            diff = z - self.centers[k]
            g = np.exp(-np.sum(diff ** 2, axis=1) / (2.0 * self.sigmas[k] ** 2))
            G += -(g / self.sigmas[k] ** 2)[:, None, None] * self.amplitudes[k][None, :, None] * diff[:, None, :]
        return float(np.linalg.norm(G, ord=2, axis=(1, 2)).max()) if len(z) else 0.0

    def det_min(self, points: np.ndarray) -> float:
        """Smallest det(I + grad D) over ``points`` (n, 3) mm: > 0 where the truth does not fold."""
        z = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return float(np.linalg.det(self.jacobian(z)).min()) if len(z) else 1.0


def random_known_transform(rng: np.random.Generator, center_mm: np.ndarray, body_points_mm: np.ndarray, *,
                           max_angle_deg: float = 15.0, max_shift_mm: float = 30.0, peak_mm: float = 0.0,
                           n_bumps: int = 4, sigma_range_mm: tuple[float, float] = (35.0, 60.0)) -> KnownTransform:
    """Seeded random truth: rotation (random axis, angle <= max_angle_deg) about ``center_mm``, shift
    (random direction, length <= max_shift_mm), and ``n_bumps`` Gaussian bumps centred on body points,
    scaled so that the largest displacement |D| over ``body_points_mm`` equals ``peak_mm``."""
    R = rotation_matrix(rng.normal(size=3), rng.uniform(0.0, max_angle_deg))
    shift = rng.normal(size=3)
    shift *= rng.uniform(0.0, max_shift_mm) / np.linalg.norm(shift)
    center = np.asarray(center_mm, dtype=np.float64)
    t = center + shift - R @ center  # z = R (y - c) + c + shift
    if peak_mm <= 0 or n_bumps <= 0:
        return KnownTransform(R, t, np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))
    centers = body_points_mm[rng.choice(len(body_points_mm), n_bumps, replace=False)]
    amps = rng.normal(size=(n_bumps, 3))
    amps /= np.linalg.norm(amps, axis=1, keepdims=True)
    sigmas = rng.uniform(*sigma_range_mm, size=n_bumps)
    k = KnownTransform(R, t, centers, amps, sigmas)
    peak = float(np.linalg.norm(k.bumps(body_points_mm), axis=1).max())
    k.amplitudes = amps * (peak_mm / peak)
    return k


def _label_field_pull(labels: np.ndarray, vox: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Labels of a smooth anatomy model at fractional grid positions ``vox`` (3, n) of ``labels``.

    Model: each label's indicator blurred by a Gaussian of ``sigma_vox`` voxels is its occupancy
    (sampled with cubic splines); background occupancy is 1 - their sum; a point takes the label of
    largest occupancy (background included), like a segmenter's argmax over soft class scores. Both
    the fixed labels (``model_labels``) and the moving labels are samples of this one smooth anatomy,
    so sub-voxel shifts move boundaries (a nearest-neighbour warp of the 3 mm label map would round
    every nearly-translational shift to whole voxels, biasing centroids by up to 1.5 mm per axis).
    ``sigma_vox`` <= 0 gives the plain nearest-neighbour warp of ``labels``.
    """
    n = vox.shape[1]
    if sigma_vox <= 0:
        return ndimage.map_coordinates(labels, np.rint(vox), order=0, mode="constant", cval=0)
    best = np.zeros(n, dtype=np.float32)
    total = np.zeros(n, dtype=np.float32)
    out = np.zeros(n, dtype=labels.dtype)
    pad = int(np.ceil(3 * sigma_vox)) + 2
    # points bucketed by their whole x index (a stable sort of small integers), so that each label tests only
    # the points in its x range
    nx = labels.shape[0]
    kx = (np.clip(np.floor(vox[0]), -1 - pad, nx + pad) + 1 + pad).astype(np.int16 if nx + 2 * pad < 32000
                                                                          else np.int32)
    order = np.argsort(kx, kind="stable")  # a radix sort for int16 keys
    starts = np.searchsorted(kx[order], np.arange(nx + 2 * pad + 4))
    for index, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None:
            continue
        label = index + 1
        lo = np.array([s.start - pad for s in sl])
        hi = np.array([s.stop + pad for s in sl])
        # inside: lo < v < hi - 1 on every axis, so floor(v_x) lies in lo_x .. hi_x - 2
        cand = order[starts[lo[0] + 1 + pad]:starts[hi[0] - 1 + 1 + pad]]
        sub = vox[:, cand]
        keep = np.all((sub > lo[:, None]) & (sub < hi[:, None] - 1), axis=0)
        if not keep.any():
            continue
        idx = cand[keep]
        crop = np.zeros(tuple(hi - lo), dtype=np.float32)
        src = tuple(slice(max(a, 0), min(b, dim)) for a, b, dim in zip(lo, hi, labels.shape, strict=True))
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True))
        crop[dst] = labels[src] == label
        occ = ndimage.gaussian_filter(crop, sigma_vox, mode="constant")
        vals = ndimage.map_coordinates(occ, sub[:, keep] - lo[:, None], order=3, mode="constant", cval=0)
        total[idx] += vals
        better = vals > best[idx]
        best[idx[better]] = vals[better]
        out[idx[better]] = label
    out[best <= 1.0 - total] = 0
    return out


def model_labels(labels: np.ndarray, sigma_vox: float = 1.0) -> np.ndarray:
    """The (x, y, z) label map as the smooth anatomy model sees it on its own grid (``_label_field_pull``)."""
    if sigma_vox <= 0:
        return labels
    idx = np.indices(labels.shape).reshape(3, -1).astype(np.float64)
    return _label_field_pull(labels, idx, sigma_vox).reshape(labels.shape)


def make_moving(fixed_img: np.ndarray, fixed_labels: np.ndarray, fixed_affine: np.ndarray, known: KnownTransform,
                margin_vox: int = 2, air_hu: float = -1024.0, label_sigma_vox: float = 1.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moving (image, labels, affine) = fixed pulled through the truth psi, on a grid covering the
    transformed fixed field of view (axes and voxel size of the fixed grid). Arrays (x, y, z).

    ``fixed_labels`` is the ORIGINAL label map (the anatomy). The image is interpolated trilinearly;
    labels come from the smooth anatomy model (``_label_field_pull``; the matching fixed labels are
    ``model_labels(fixed_labels, label_sigma_vox)``). Only the box of the fixed scan's content (labels or
    HU above air + 124, plus ``margin_vox``) is covered: the air padding around a body (e.g. a clinical
    512 x 512 field of view) maps to air and background anyway, and the moving voxel lattice does not
    depend on the box (whole fixed-grid voxels), so the labels inside are the same.
    """
    shape = fixed_img.shape
    content = (fixed_labels > 0) | (fixed_img > air_hu + 124.0)
    box_lo, box_hi = np.zeros(3, dtype=int), np.array(shape) - 1
    if content.any():
        nz = [np.flatnonzero(content.any(axis=tuple(e for e in range(3) if e != d))) for d in range(3)]
        box_lo = np.maximum(np.array([v[0] for v in nz]) - margin_vox, 0)
        box_hi = np.minimum(np.array([v[-1] for v in nz]) + margin_vox, np.array(shape) - 1)
    # sample the content box's boundary (faces, every 4th voxel) and map it into the moving frame
    axes = [np.unique(np.r_[np.arange(a, b + 1, 4), b]) for a, b in zip(box_lo, box_hi, strict=True)]
    pts = []
    for d in range(3):
        for end in (box_lo[d], box_hi[d]):
            other = [axes[e] for e in range(3) if e != d]
            a, b = np.meshgrid(*other, indexing="ij")
            face = np.empty((a.size, 3))
            face[:, d] = end
            face[:, [e for e in range(3) if e != d]] = np.stack([a.ravel(), b.ravel()], axis=1)
            pts.append(face)
    face_mm = voxel_to_world(np.concatenate(pts), fixed_affine)
    y = known.fixed_to_moving(face_mm)
    ijk = world_to_voxel(y, fixed_affine)  # moving positions in the fixed grid's index frame
    lo = np.floor(ijk.min(axis=0)).astype(int) - margin_vox
    hi = np.ceil(ijk.max(axis=0)).astype(int) + margin_vox
    moving_affine = fixed_affine.copy()
    moving_affine[:3, 3] = voxel_to_world(lo[None], fixed_affine)[0]
    mshape = tuple(int(v) for v in hi - lo + 1)
    # pull: moving voxel -> world y -> psi(y) fixed world -> fixed voxel
    yw = grid_world(mshape, moving_affine)
    fv = world_to_voxel(known.moving_to_fixed(yw), fixed_affine).T
    img = ndimage.map_coordinates(fixed_img.astype(np.float32, copy=False), fv, order=1, mode="constant",
                                  cval=air_hu).reshape(mshape)
    lab = _label_field_pull(fixed_labels, fv, label_sigma_vox).reshape(mshape)
    return img, lab, moving_affine


def ellipsoid_structure(label: int, name: str, centre: np.ndarray, radii: np.ndarray, axes: np.ndarray,
                        directions: np.ndarray, voxel_count: int) -> Structure:
    """A solid ellipsoid as a passport Structure (world mm): ``centre`` (3,), semi-axes ``radii`` (3,) mm
    along the columns of the rotation ``axes`` (3, 3); one boundary point on its surface per row of
    ``directions`` (n, 3, normalised here). There is no scan grid behind it: the voxel box is the world box
    rounded outwards, on 1 mm voxels at the world origin."""
    directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    surf = centre + (directions * radii) @ axes.T
    cov = axes @ np.diag(radii ** 2 / 5.0) @ axes.T  # solid ellipsoid second moments
    vals, vecs = np.linalg.eigh(cov)
    lo, hi = surf.min(axis=0), surf.max(axis=0)
    return Structure(label=label, name=name, voxel_count=voxel_count, volume_mm3=float(4 / 3 * np.pi * np.prod(radii)),
                     centroid_mm=centre, covariance_mm2=cov, eigenvalues_mm2=vals, eigenvectors=vecs,
                     bbox_voxel=Box(min=np.floor(lo).astype(np.int64), max=np.ceil(hi).astype(np.int64)),
                     bbox_mm=Box(min=lo, max=hi), boundary_points_mm=surf, n_boundary_voxels=len(surf))


def synthetic_structures(n_structures: int, n_points: int, rng: np.random.Generator) -> list[Structure]:
    """Ellipsoid structures (world mm) with centroids, covariance eigen-decomposition and surface points."""
    out = []
    for i in range(n_structures):
        c = rng.uniform([-150, -150, -300], [150, 150, 300])
        radii = rng.uniform(8, 60, size=3)
        Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        d = rng.normal(size=(n_points, 3))
        out.append(ellipsoid_structure(i + 1, f"structure_{i + 1}", c, radii, Q, d, voxel_count=1000))
    return out
