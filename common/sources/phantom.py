"""Synthetic CT phantom with ground-truth labels: the embedded default dataset (runs offline).

Everything here is in nibabel conventions:
- arrays are indexed (x, y, z) = (i, j, k) voxel axes;
- world coordinates are millimetres in RAS+: +x towards the patient's Right, +y Anterior, +z Superior
  (checked against the real example CT, where the liver lies at +x and the vertebrae at lower y than
  the aorta; see tests/test_phantom.py);
- the affine is diagonal (voxel spacing in mm on the diagonal) and centres the volume on world 0.

The anatomy is fixed in world mm (independent of spacing and field of view); the field of view is a
box centred on world (0, 0, 0) that crops it. CT values are Hounsfield units (HU), stored as int16;
labels are TotalSegmentator 'total' class ids (uint8), looked up by class name.

Shapes are drawn with vectorised numpy on open coordinate grids, each inside its own world bounding
box only, so the full clinical size (400 x 350 x 200 voxels) takes a few seconds.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from common.core.atomic import atomic_save_nifti
from common.imaging.labels import total_class_ids, total_class_names

DEFAULT_SPACING_MM = (0.8, 0.8, 1.5)
DEFAULT_FOV_MM = (320.0, 280.0, 300.0)  # -> 400 x 350 x 200 voxels at the default spacing

# Body outline: elliptic cylinder along z centred on the z axis; semi-axes (x, y) in mm.
BODY_SEMI_AXES_MM = (150.0, 115.0)
SKIN_MM = 3.0          # skin thickness
FAT_MM = 15.0          # subcutaneous fat thickness (inside the skin)
MUSCLE_WALL_MM = 10.0  # muscle wall between the subcutaneous fat and the body cavity

# Spine: vertebra centres every VERTEBRA_PERIOD_MM along z (bodies VERTEBRA_BODY_MM high, discs in
# between), vertebral-body centre line at x = 0, y = SPINE_Y_MM (posterior to the aorta).
VERTEBRA_PERIOD_MM = 25.0
VERTEBRA_BODY_MM = 20.0
SPINE_Y_MM = -45.0
L1_Z_MM = -10.0  # world z (mm) of the centre of vertebra L1
VERTEBRA_NAMES = tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6)) + ("S1",)

# Lungs are split into lobes simply by world height z (mm): lobe = upper above the first cut, etc.
LEFT_LUNG_UPPER_Z_MM = 100.0
RIGHT_LUNG_UPPER_Z_MM = 125.0
RIGHT_LUNG_MIDDLE_Z_MM = 95.0

HU = {
    "air": -1000.0,
    "skin": 40.0,
    "fat": -100.0,
    "muscle": 50.0,
    "lung": -850.0,
    "cortical": 700.0,
    "cancellous": 300.0,
    "posterior_elements": 600.0,
    "disc": 80.0,
    "csf": 15.0,
    "liver": 60.0,
    "spleen": 55.0,
    "kidney": 35.0,
    "aorta": 200.0,
    "heart": 150.0,
}

SMOOTH_SIGMA_VOXELS = 0.7
NOISE_SD_HU = 15.0
HU_MIN, HU_MAX = -1024, 3071


def vertebra_centre_z(name: str) -> float:
    """World z (mm, RAS+) of the centre of vertebra ``name`` (e.g. "T12", "L1")."""
    k = VERTEBRA_NAMES.index(name) - VERTEBRA_NAMES.index("L1")
    return L1_Z_MM - VERTEBRA_PERIOD_MM * k


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS+ affine (voxel (i, j, k) -> world mm) with ``spacing`` on the diagonal, volume centred on 0."""
    sp = np.asarray(spacing, dtype=np.float64)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * sp
    return aff


class _Grid:
    """Voxel-centre coordinates (world mm) of an axis-aligned (x, y, z) grid; cropping to world boxes."""

    def __init__(self, shape: tuple[int, int, int], affine: np.ndarray):
        self.shape = shape
        self.spacing = np.diag(affine)[:3]
        self.origin = affine[:3, 3]
        self.axes = [self.origin[d] + self.spacing[d] * np.arange(shape[d]) for d in range(3)]

    def box(self, lo, hi):
        """Slices and open (x, y, z) coordinate grids (mm) of the voxels whose centres lie in [lo, hi].

        Returns None if the box misses the grid.
        """
        slices, coords = [], []
        for d in range(3):
            i0 = max(int(np.ceil((lo[d] - self.origin[d]) / self.spacing[d])), 0)
            i1 = min(int(np.floor((hi[d] - self.origin[d]) / self.spacing[d])) + 1, self.shape[d])
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
            shp = [1, 1, 1]
            shp[d] = i1 - i0
            coords.append(self.axes[d][i0:i1].reshape(shp))
        return tuple(slices), coords


def _ellipsoid(centre, semi) -> tuple[Callable, tuple, tuple]:
    """Mask function, and world bounding box, of a solid axis-aligned ellipsoid (mm)."""
    c = np.asarray(centre, dtype=np.float64)
    s = np.asarray(semi, dtype=np.float64)

    def fn(x, y, z):
        return ((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2 <= 1.0

    return fn, tuple(c - s), tuple(c + s)


def _elliptic_cylinder(cx, cy, ax, ay, z0, z1) -> tuple[Callable, tuple, tuple]:
    """Mask function and world box of an elliptic cylinder along z, semi-axes (ax, ay), z in [z0, z1] (mm)."""

    def fn(x, y, z):
        return (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0) & (z >= z0) & (z <= z1)

    return fn, (cx - ax, cy - ay, z0), (cx + ax, cy + ay, z1)


class _Painter:
    """Paints shapes into the float HU array and the label array, each within its bounding box."""

    def __init__(self, grid: _Grid, ct: np.ndarray, labels: np.ndarray):
        self.grid, self.ct, self.labels = grid, ct, labels

    def paint(self, shape, hu: float | None = None, label: int | None = None) -> None:
        """Set ``hu`` (if given) and ``label`` (if given; 0 erases) inside ``shape`` = (mask_fn, lo, hi)."""
        fn, lo, hi = shape
        found = self.grid.box(lo, hi)
        if found is None:
            return
        sl, (x, y, z) = found
        mask = np.broadcast_to(fn(x, y, z), tuple(s.stop - s.start for s in sl))
        if hu is not None:
            self.ct[sl][mask] = hu
        if label is not None:
            self.labels[sl][mask] = label


def _body_layers(grid: _Grid) -> np.ndarray:
    """2-D (x, y) map of body-wall HU (air, skin, fat, muscle, cavity-fat), constant along z."""
    x = grid.axes[0][:, None]
    y = grid.axes[1][None, :]
    a, b = BODY_SEMI_AXES_MM

    def inside(shrink):
        return (x / (a - shrink)) ** 2 + (y / (b - shrink)) ** 2 <= 1.0

    layer = np.full((grid.shape[0], grid.shape[1]), HU["air"], dtype=np.float32)
    layer[inside(0.0)] = HU["skin"]
    layer[inside(SKIN_MM)] = HU["fat"]
    layer[inside(SKIN_MM + FAT_MM)] = HU["muscle"]
    cavity = inside(SKIN_MM + FAT_MM + MUSCLE_WALL_MM)
    # paraspinal (autochthonous) muscles stay muscle: two ellipses either side behind the spine
    para = np.zeros_like(cavity)
    for side in (-1.0, 1.0):
        para |= ((x - side * 38.0) / 30.0) ** 2 + ((y + 82.0) / 24.0) ** 2 <= 1.0
    para |= (np.abs(x) <= 12.0) & (y <= -55.0)
    layer[cavity & ~para] = HU["fat"]
    return layer


def _draw_lungs(p: _Painter, ids: dict[str, int]) -> None:
    """Two ellipsoidal lungs (HU "lung"), lobes split by world height z; organs drawn later carve their bases."""
    for side, name in ((1.0, "right"), (-1.0, "left")):
        lung = _ellipsoid((side * 65.0, -5.0, 110.0), (50.0, 70.0, 90.0))
        p.paint(lung, HU["lung"])
        fn, lo, hi = lung
        if name == "left":
            cuts = [("lung_lower_lobe_left", -np.inf, LEFT_LUNG_UPPER_Z_MM),
                    ("lung_upper_lobe_left", LEFT_LUNG_UPPER_Z_MM, np.inf)]
        else:
            cuts = [("lung_lower_lobe_right", -np.inf, RIGHT_LUNG_MIDDLE_Z_MM),
                    ("lung_middle_lobe_right", RIGHT_LUNG_MIDDLE_Z_MM, RIGHT_LUNG_UPPER_Z_MM),
                    ("lung_upper_lobe_right", RIGHT_LUNG_UPPER_Z_MM, np.inf)]
        for lobe, z0, z1 in cuts:
            lo_l = (lo[0], lo[1], max(lo[2], z0))
            hi_l = (hi[0], hi[1], min(hi[2], z1 - 1e-6))
            p.paint((fn, lo_l, hi_l), label=ids[lobe])


def _draw_spine(p: _Painter, ids: dict[str, int], z_range: tuple[float, float]) -> list[str]:
    """Vertebral bodies (cortical shell + cancellous core), discs, posterior elements; return names drawn."""
    drawn = []
    half = VERTEBRA_BODY_MM / 2.0
    n = len(VERTEBRA_NAMES)
    for k, name in enumerate(VERTEBRA_NAMES):
        zc = vertebra_centre_z(name)
        if zc + VERTEBRA_PERIOD_MM / 2 < z_range[0] or zc - VERTEBRA_PERIOD_MM / 2 > z_range[1]:
            continue
        label = ids[f"vertebrae_{name}"]
        t = k / (n - 1)  # 0 at T1 (small) .. 1 at S1 (large)
        ax, ay = 15.0 + 9.0 * t, 12.0 + 6.0 * t
        # intervertebral disc below this vertebra (unlabelled)
        p.paint(_elliptic_cylinder(0.0, SPINE_Y_MM, ax, ay, zc - VERTEBRA_PERIOD_MM / 2, zc - half), HU["disc"])
        p.paint(_elliptic_cylinder(0.0, SPINE_Y_MM, ax, ay, zc - half, zc + half), HU["cortical"], label)
        p.paint(_elliptic_cylinder(0.0, SPINE_Y_MM, ax - 2.0, ay - 2.0, zc - half + 2.0, zc + half - 2.0),
                HU["cancellous"])
        # posterior elements: ring around the spinal canal, transverse and spinous processes
        canal_y = SPINE_Y_MM - ay - 8.0
        ring = _elliptic_cylinder(0.0, canal_y, 14.0, 14.0, zc - half + 1.0, zc + half - 1.0)
        p.paint(ring, HU["posterior_elements"], label)
        p.paint(_elliptic_cylinder(0.0, canal_y, 8.0, 8.0, zc - half + 1.0, zc + half - 1.0), HU["csf"], 0)
        zmid = (zc - half + 4.0, zc + half - 4.0)
        for side in (-1.0, 1.0):
            p.paint(_box((side * 26.0, canal_y + 2.0, zc), (13.0, 5.0, 6.0)), HU["posterior_elements"], label)
        spinous_len = 24.0
        p.paint(_box((0.0, canal_y - 12.0 - spinous_len / 2, sum(zmid) / 2), (3.5, spinous_len / 2, 6.0)),
                HU["posterior_elements"], label)
        drawn.append(name)
    return drawn


def _box(centre, half) -> tuple[Callable, tuple, tuple]:
    """Solid axis-aligned box (mm): mask function and world bounding box."""
    c = np.asarray(centre, dtype=np.float64)
    h = np.asarray(half, dtype=np.float64)

    def fn(x, y, z):
        return (np.abs(x - c[0]) <= h[0]) & (np.abs(y - c[1]) <= h[1]) & (np.abs(z - c[2]) <= h[2])

    return fn, tuple(c - h), tuple(c + h)


# Ribs run on an elliptic arc just inside the muscle wall, from beside the spine (angle RIB_START_DEG
# from the posterior direction) round the side towards the front, sloping down anteriorly.
RIB_ARC_SEMI_MM = (BODY_SEMI_AXES_MM[0] - 24.0, BODY_SEMI_AXES_MM[1] - 24.0)
RIB_START_DEG = 18.0
RIB_DROP_MM_PER_DEG = 0.3
RIB_HALF_THICK_MM = (4.5, 7.0)  # radial, vertical half-thickness of the rib cross-section
RIB_END_DEG = {1: 150, 2: 150, 3: 150, 4: 150, 5: 150, 6: 150, 7: 150, 8: 140, 9: 135, 10: 130, 11: 100, 12: 70}


def _rib(n: int, side: float) -> tuple[Callable, tuple, tuple]:
    """Rib ``n`` (1..12) on ``side`` (+1 = patient right = +x, -1 = left): a curved tube (torus-like segment)."""
    z_attach = vertebra_centre_z(f"T{n}")
    a_r, b_r = RIB_ARC_SEMI_MM
    th0, th1 = np.deg2rad(RIB_START_DEG), np.deg2rad(RIB_END_DEG[n])
    drop = RIB_DROP_MM_PER_DEG * (RIB_END_DEG[n] - RIB_START_DEG)
    hr, hz = RIB_HALF_THICK_MM

    def fn(x, y, z):
        r = np.hypot(x, y)  # (nx, ny, 1)
        th = np.arctan2(side * x, -y)  # angle from posterior (-y) towards this side, then anterior
        R = 1.0 / np.sqrt((np.sin(th) / a_r) ** 2 + (np.cos(th) / b_r) ** 2)
        zc = z_attach - RIB_DROP_MM_PER_DEG * np.rad2deg(th - th0)
        ok = (th >= th0) & (th <= th1)
        return ok & (((r - R) / hr) ** 2 + ((z - zc) / hz) ** 2 <= 1.0)

    x_lo, x_hi = (0.0, a_r + hr) if side > 0 else (-a_r - hr, 0.0)
    return fn, (x_lo, -b_r - hr, z_attach - drop - hz), (x_hi, b_r + hr, z_attach + hz)


def _draw_ribs(p: _Painter, ids: dict[str, int]) -> None:
    """Ribs 1..12 on both sides (cortical bone throughout); those outside the field of view draw nothing."""
    for n in range(1, 13):
        for side, sname in ((1.0, "right"), (-1.0, "left")):
            p.paint(_rib(n, side), HU["cortical"], ids[f"rib_{sname}_{n}"])


def make_phantom(shape: tuple[int, int, int] | None = None,
                 spacing: tuple[float, float, float] = DEFAULT_SPACING_MM,
                 seed: int = 0,
                 fov_mm: tuple[float, float, float] | None = None) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Build the synthetic CT phantom and its ground-truth label map.

    Parameters
    ----------
    shape: voxel counts along (x, y, z). Default: ``round(fov_mm / spacing)``.
    spacing: voxel size in mm along (x, y, z).
    seed: seed of the (Gaussian, sd ``NOISE_SD_HU``) image noise; same seed -> identical arrays.
    fov_mm: field of view in mm along (x, y, z), centred on world 0; default ``DEFAULT_FOV_MM``
        (320 x 280 x 300 mm -> 400 x 350 x 200 voxels at 0.8 x 0.8 x 1.5 mm). Give ``shape`` or
        ``fov_mm``, not both. A smaller field of view crops the (fixed, world-mm) anatomy.

    Returns
    -------
    (ct, labels): nibabel images with arrays indexed (x, y, z) and the same RAS+ affine (world mm,
    spacing on the diagonal, volume centre at world 0). ``ct`` holds int16 Hounsfield units,
    ``labels`` uint8 TotalSegmentator 'total' class ids (0 = background); only structures drawn
    inside the field of view appear.
    """
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive mm values, got {spacing}")
    if shape is not None and fov_mm is not None:
        raise ValueError("give shape or fov_mm, not both")
    if shape is None:
        fov = DEFAULT_FOV_MM if fov_mm is None else tuple(float(f) for f in fov_mm)
        shape = tuple(max(1, int(round(f / s))) for f, s in zip(fov, spacing, strict=True))
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive voxel counts, got {shape}")

    ids = total_class_ids()
    affine = phantom_affine(shape, spacing)
    grid = _Grid(shape, affine)
    ct = np.empty(shape, dtype=np.float32)
    ct[...] = _body_layers(grid)[:, :, None]
    labels = np.zeros(shape, dtype=np.uint8)
    p = _Painter(grid, ct, labels)

    _draw_lungs(p, ids)
    p.paint(_ellipsoid((-10.0, 35.0, 85.0), (50.0, 42.0, 45.0)), HU["heart"], ids["heart"])
    p.paint(_ellipsoid((58.0, 10.0, 5.0), (62.0, 60.0, 58.0)), HU["liver"], ids["liver"])
    p.paint(_ellipsoid((-85.0, -15.0, 30.0), (22.0, 40.0, 45.0)), HU["spleen"], ids["spleen"])
    p.paint(_ellipsoid((55.0, -40.0, -35.0), (25.0, 20.0, 55.0)), HU["kidney"], ids["kidney_right"])
    p.paint(_ellipsoid((-55.0, -40.0, -25.0), (25.0, 20.0, 55.0)), HU["kidney"], ids["kidney_left"])
    z_range = (grid.axes[2][0], grid.axes[2][-1])
    _draw_spine(p, ids, z_range)
    aorta_bottom = vertebra_centre_z("L4")
    p.paint(_elliptic_cylinder(-14.0, SPINE_Y_MM + 30.0, 11.0, 11.0, aorta_bottom, 1e4), HU["aorta"], ids["aorta"])
    _draw_ribs(p, ids)

    ct = gaussian_filter(ct, sigma=SMOOTH_SIGMA_VOXELS, mode="nearest")
    rng = np.random.default_rng(seed)
    ct += rng.standard_normal(shape, dtype=np.float32) * np.float32(NOISE_SD_HU)
    np.clip(np.rint(ct, out=ct), HU_MIN, HU_MAX, out=ct)
    ct_img = _image(ct.astype(np.int16), affine, np.int16, f"ts-bench CT phantom seed={seed}")
    lab_img = _image(labels, affine, np.uint8, "ts-bench CT phantom labels (TotalSegmentator total ids)")
    return ct_img, lab_img


def _image(data: np.ndarray, affine: np.ndarray, dtype, descrip: str) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip.encode("ascii")[:79]
    return img


def phantom_label_names(labels: nib.Nifti1Image | np.ndarray) -> dict[int, str]:
    """Label id -> TotalSegmentator 'total' class name for every id present in ``labels`` (0 excluded)."""
    arr = np.asarray(labels.dataobj if isinstance(labels, nib.Nifti1Image) else labels)
    names = total_class_names()
    present = np.flatnonzero(np.bincount(arr.ravel(), minlength=1))
    return {int(i): names[int(i)] for i in present if i != 0}


def write_phantom(folder: str | Path, name: str = "phantom_ct", **kwargs) -> tuple[Path, Path]:
    """Write ``<name>.nii.gz`` (CT, int16 HU) and ``<name>_labels.nii.gz`` (uint8 ids) atomically.

    ``kwargs`` go to :func:`make_phantom` (shape, spacing, seed, fov_mm). Returns (ct_path, labels_path).
    """
    folder = Path(folder)
    ct, labels = make_phantom(**kwargs)
    ct_path = atomic_save_nifti(ct, folder / f"{name}.nii.gz")
    lab_path = atomic_save_nifti(labels, folder / f"{name}_labels.nii.gz")
    return ct_path, lab_path
