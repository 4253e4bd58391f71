"""A known breathing motion for the accuracy harness: a displacement field D (mm) in the FIXED frame.

World mm, RAS+ (x = left, y = anterior, z = superior); label maps and images are (x, y, z) arrays. Built from
the fixed label map only (TotalSegmentator class names), it has three parts:

- cranio-caudal shift of the diaphragm and what lies under it: ``cc_mm`` (10-30 mm) along z times a decay
  w(d) = 1 - smoothstep(d / ``decay_mm``) of the distance d (mm) to the lungs (a 3 mm distance map) (1 in the lungs,
  exactly 0 from ``decay_mm`` on), times the sliding mask s(x, y);
- sliding at the lung boundary: s(x, y) is 1 inside the in-plane outline of the lungs and abdominal organs
  (their projection along z, holes filled) and 0 outside it, in the chest wall, with a smooth step of width
  ``slide_mm``; it is forced to exactly 0 on the projection of the spine and the paraspinal muscles (rising
  back to 1 over ``slide_mm`` / 2), so the spine never moves. s depends on (x, y) only: the large in-plane
  gradient of the shift is a shear (determinant 1), which is how the lungs slide along the chest wall;
- anterior-posterior chest expansion: ``ap_mm`` along +y, a smooth ramp from 0 at the front of the vertebral
  bodies (and everywhere behind it) to 1 at the front of the body, times w(d) with twice the decay length.

So the field is exactly zero at the spine and from ``decay_mm`` away from the lungs (``BreathingField``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

import numpy as np
from scipy import ndimage

from common.imaging.geometry import voxel_to_world
from registration.synthetic import KnownTransform, random_known_transform

LUNG = ("lung_*",)
ABDOMEN = ("liver", "spleen", "stomach", "pancreas", "gallbladder", "kidney_*", "adrenal_gland_*", "duodenum",
           "small_bowel", "colon", "esophagus", "inferior_vena_cava", "portal_vein_and_splenic_vein", "heart",
           "urinary_bladder")
BONE = ("vertebrae_*", "rib_*", "sternum", "costal_cartilages", "sacrum", "hip_*", "scapula_*", "clavicula_*",
        "humerus_*", "femur_*", "skull")
STATIC = ("vertebrae_*", "sacrum", "spinal_cord", "hip_*")


def smoothstep(t: np.ndarray) -> np.ndarray:
    """0 for t <= 0, 1 for t >= 1, 6t^5 - 15t^4 + 10t^3 in between (C2, slope at most 1.875)."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * t * (t * (6.0 * t - 15.0) + 10.0)


def label_mask(labels: np.ndarray, names: dict[int, str], patterns: tuple[str, ...]) -> np.ndarray:
    """(x, y, z) bool mask of the labels whose class name matches one of the fnmatch ``patterns``."""
    ids = [k for k, n in names.items() if any(fnmatchcase(n, p) for p in patterns)]
    return np.isin(labels, ids) if ids else np.zeros(labels.shape, dtype=bool)


@dataclass
class AxisMap:
    """A map on the first d world axes (d = values.ndim: 2 for (x, y), 3 for (x, y, z)): ``values`` at
    origin + index * spacing mm; linear interpolation, edge values outside."""

    values: np.ndarray
    origin: np.ndarray
    spacing: float

    def __call__(self, points: np.ndarray) -> np.ndarray:
        d = self.values.ndim
        idx = (np.asarray(points, dtype=np.float64)[:, :d] - self.origin) / self.spacing
        return ndimage.map_coordinates(self.values, idx.T, order=1, mode="nearest")


def _raster(points: np.ndarray, origin: np.ndarray, spacing: float, shape: tuple[int, ...]) -> np.ndarray:
    """Bool raster (``shape``) of the cells holding at least one of the (n, d) world points."""
    out = np.zeros(shape, dtype=bool)
    if len(points):
        ij = np.floor((points - origin) / spacing + 0.5).astype(np.int64)
        ij = ij[(ij >= 0).all(axis=1) & (ij < np.array(shape)).all(axis=1)]
        out[tuple(ij.T)] = True
    return out


def lung_distance(lung_points_mm: np.ndarray, extent_mm: np.ndarray, margin_mm: float,
                  spacing_mm: float = 3.0) -> AxisMap:
    """Distance (mm) to the nearest lung point, on a world-aligned grid of ``spacing_mm`` covering the
    [[min], [max]] ``extent_mm`` and the lungs plus ``margin_mm`` (scipy.ndimage.distance_transform_edt)."""
    lo = np.minimum(extent_mm[0], lung_points_mm.min(axis=0)) - margin_mm
    hi = np.maximum(extent_mm[1], lung_points_mm.max(axis=0)) + margin_mm
    shape = tuple(int(v) for v in np.ceil((hi - lo) / spacing_mm).astype(int) + 1)
    lung = _raster(lung_points_mm, lo, spacing_mm, shape)
    return AxisMap(ndimage.distance_transform_edt(~lung, sampling=spacing_mm), lo, spacing_mm)


def sliding_map(labels: np.ndarray, affine: np.ndarray, names: dict[int, str], slide_mm: float,
                margin_mm: float = 60.0) -> AxisMap:
    """s(x, y) (module docstring) from the (x, y, z) fixed label map on ``affine`` (voxel -> world mm)."""
    spacing = float(min(np.linalg.norm(affine[:3, :2], axis=0)))
    inner = voxel_to_world(np.argwhere(label_mask(labels, names, LUNG + ABDOMEN)), affine)[:, :2]
    static = voxel_to_world(np.argwhere(label_mask(labels, names, STATIC)), affine)[:, :2]
    allp = np.concatenate([inner, static, voxel_to_world(np.argwhere(labels > 0), affine)[:, :2]])
    lo = allp.min(axis=0) - margin_mm if len(allp) else np.zeros(2)
    hi = allp.max(axis=0) + margin_mm if len(allp) else np.ones(2)
    shape = tuple(int(v) for v in np.ceil((hi - lo) / spacing).astype(int) + 1)
    inside = ndimage.binary_fill_holes(ndimage.binary_closing(_raster(inner, lo, spacing, shape), iterations=3))
    depth = ndimage.distance_transform_edt(inside, sampling=spacing) - \
        ndimage.distance_transform_edt(~inside, sampling=spacing)
    s = smoothstep(depth / slide_mm + 0.5)
    spine = _raster(static, lo, spacing, shape)
    if spine.any():
        s = s * smoothstep(ndimage.distance_transform_edt(~spine, sampling=spacing) / (0.5 * slide_mm))
    return AxisMap(s, lo, spacing)


@dataclass
class BreathingField:
    """D(z) (n, 3) mm at fixed-frame points z (n, 3) mm (module docstring): ``cc_mm`` along +z (negative:
    caudal), ``ap_mm`` along +y; ``lung_distance`` the distance (mm) to the lungs; ``slide`` s(x, y);
    ``y_spine`` / ``y_front`` (mm) where the expansion ramp starts and ends."""

    cc_mm: float
    ap_mm: float
    decay_mm: float
    slide_mm: float
    lung_distance: AxisMap
    slide: AxisMap
    y_spine: float
    y_front: float

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64).reshape(-1, 3)
        out = np.zeros_like(z)
        if not len(z):
            return out
        d = self.lung_distance(z)  # beyond its grid: the edge value, itself >= 2 decay_mm from the lungs
        out[:, 2] = self.cc_mm * self.slide(z) * (1.0 - smoothstep(d / self.decay_mm))
        ramp = smoothstep((z[:, 1] - self.y_spine) / max(self.y_front - self.y_spine, 1.0))
        out[:, 1] = self.ap_mm * ramp * (1.0 - smoothstep(d / (2.0 * self.decay_mm)))
        return out


def breathing_field(labels: np.ndarray, affine: np.ndarray, names: dict[int, str], body_points_mm: np.ndarray,
                    cc_mm: float = 0.0, ap_mm: float = 0.0, decay_mm: float = 100.0,
                    slide_mm: float = 20.0) -> BreathingField:
    """The BreathingField of a fixed (x, y, z) label map (``affine``: voxel -> world mm) and its (n, 3) body
    points (mm). ValueError when the map has no lung voxels."""
    lung = voxel_to_world(np.argwhere(label_mask(labels, names, LUNG)), affine)
    if not len(lung):
        raise ValueError("a breathing motion needs lungs in the label map (lung_* classes)")
    spine = voxel_to_world(np.argwhere(label_mask(labels, names, ("vertebrae_*",))), affine)
    y_front = float(np.percentile(body_points_mm[:, 1], 99.5)) if len(body_points_mm) else float(lung[:, 1].max())
    y_spine = float(spine[:, 1].max()) if len(spine) else float(np.median(body_points_mm[:, 1]))
    extent = np.stack([body_points_mm.min(axis=0), body_points_mm.max(axis=0)]) if len(body_points_mm) else \
        np.stack([lung.min(axis=0), lung.max(axis=0)])
    return BreathingField(float(cc_mm), float(ap_mm), float(decay_mm), float(slide_mm),
                          lung_distance(lung, extent, 2.0 * decay_mm + 10.0),
                          sliding_map(labels, affine, names, slide_mm), y_spine, y_front)


def region_points(labels: np.ndarray, affine: np.ndarray, names: dict[int, str], n: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded (<= n, 3) world-mm samples of the voxels in the lungs, the abdominal organs and bone."""
    out = {}
    for key, patterns in (("lungs", LUNG), ("abdomen", ABDOMEN), ("bone", BONE)):
        idx = np.argwhere(label_mask(labels, names, patterns))
        if len(idx) > n:
            idx = idx[np.sort(rng.choice(len(idx), n, replace=False))]
        out[key] = voxel_to_world(idx, affine)
    return out


def random_breathing_transform(rng: np.random.Generator, center_mm: np.ndarray, body_points_mm: np.ndarray,
                               template: BreathingField, *, max_angle_deg: float = 15.0, max_shift_mm: float = 30.0,
                               cc_range_mm: tuple[float, float] = (10.0, 30.0),
                               ap_range_mm: tuple[float, float] = (4.0, 10.0)) -> KnownTransform:
    """Seeded truth: the rigid part of registration.synthetic.random_known_transform (no bumps) and the
    ``template`` BreathingField (``breathing_field`` of the fixed labels: its geometry) with a cranio-caudal
    shift drawn from ``cc_range_mm`` (either sign: inhale or exhale) and an AP expansion drawn from
    ``ap_range_mm`` (its sign follows: the chest expands when the diaphragm descends)."""
    rigid = random_known_transform(rng, center_mm, body_points_mm, max_angle_deg=max_angle_deg,
                                   max_shift_mm=max_shift_mm, peak_mm=0.0)
    sign = 1.0 if rng.uniform() < 0.5 else -1.0
    cc, ap = sign * rng.uniform(*cc_range_mm), rng.uniform(*ap_range_mm)
    field = replace(template, cc_mm=float(cc), ap_mm=float(-sign * ap))
    return KnownTransform(rigid.rotation, rigid.translation, np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), field)
