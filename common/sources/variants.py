"""Pure transforms that make test/benchmark variants of a scan: reorientation and resampling.

Arrays are nibabel-ordered (x, y, z) voxel axes; affines map voxel indices to world mm, RAS+.
Every function returns a new ``nib.Nifti1Image`` and leaves its input untouched; world positions
are preserved (a voxel centre's world coordinate still shows the same anatomy).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from common.core.atomic import atomic_save_nifti

REALISTIC_SPACING_MM: tuple[float, float, float] = (0.8, 0.8, 1.5)
INT16_MIN, INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max


def _new_image(data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image) -> nib.Nifti1Image:
    """A fresh NIfTI image for ``data``/``affine`` (no stale scaling), keeping ``like``'s form codes."""
    out = nib.Nifti1Image(data, affine)
    out.set_data_dtype(data.dtype)
    try:
        sform_code, qform_code = int(like.header["sform_code"]), int(like.header["qform_code"])
    except (KeyError, TypeError, ValueError):
        sform_code, qform_code = 0, 0
    out.set_sform(affine, code=sform_code or 2)
    out.set_qform(affine, code=qform_code or 0)
    out.header.set_xyzt_units("mm", "sec")
    return out


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along the (x, y, z) array axes: column norms of the affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def reorient(img: nib.Nifti1Image, axcodes: str) -> nib.Nifti1Image:
    """Return ``img`` with its array axes permuted/flipped to the orientation ``axcodes`` (e.g. "LPS").

    The affine is updated so every voxel keeps its world position; the data dtype is kept.
    Raises ValueError for axis codes that are not three distinct axes (e.g. "LLS", "XYZ").
    """
    codes = tuple(str(axcodes).upper())
    if len(codes) != 3:
        raise ValueError(f"axis codes must be 3 letters such as 'RAS' or 'LPS', got {axcodes!r}")
    try:
        target = nio.axcodes2ornt(codes)
    except ValueError as exc:
        raise ValueError(f"invalid axis codes {axcodes!r}: {exc}") from exc
    if np.isnan(target).any() or len(set(target[:, 0].tolist())) != 3:
        raise ValueError(f"invalid axis codes {axcodes!r}")
    affine = np.asarray(img.affine, dtype=np.float64)
    start = nio.io_orientation(affine)
    transform = nio.ornt_transform(start, target)
    data = np.asanyarray(img.dataobj)
    new_data = np.ascontiguousarray(nio.apply_orientation(data, transform))
    new_affine = affine @ nio.inv_ornt_aff(transform, data.shape)
    return _new_image(new_data, new_affine, img)


def resample_variant(img: nib.Nifti1Image, spacing_mm: tuple[float, float, float],
                        order: int = 1) -> nib.Nifti1Image:
    """Resample a 3D image to voxel size ``spacing_mm`` (x, y, z mm) with spline ``order`` (0 = nearest).

    zoom[i] = old_spacing[i] / spacing_mm[i]; the output shape is round(shape * zoom) (at least 1)
    and, as in TotalSegmentator's change_spacing, new_affine[:3, i] = affine[:3, i] / zoom[i] (the
    origin, i.e. the centre of voxel 0, is unchanged, so the world extent is preserved to within
    half an output voxel). Unlike a bare ``scipy.ndimage.zoom`` (which stretches so the corner
    voxels align and the effective spacing drifts from the request), sampling uses exactly that
    scale: output voxel j samples input coordinate j / zoom, so the affine is exact for the data.

    Integer input gives int16 output (rounded, clipped to the int16 range); float input keeps its
    float dtype. Raises ValueError for non-3D data or a non-positive/non-finite spacing.
    """
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"resample_variant needs 3D data, got shape {data.shape}")
    new_spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if new_spacing.size == 1:
        new_spacing = np.repeat(new_spacing, 3)
    if new_spacing.size != 3 or not np.all(np.isfinite(new_spacing)) or np.any(new_spacing <= 0):
        raise ValueError(f"target spacing must be 3 positive finite numbers (mm), got {spacing_mm!r}")
    affine = np.asarray(img.affine, dtype=np.float64)
    old_spacing = _spacing(affine)
    if not np.all(np.isfinite(old_spacing)) or np.any(old_spacing <= 0):
        raise ValueError(f"image has a degenerate affine (voxel sizes {old_spacing.tolist()})")
    zoom = old_spacing / new_spacing
    out_shape = tuple(max(1, int(round(n * z))) for n, z in zip(data.shape, zoom, strict=True))

    integer_in = np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_
    work_dtype = np.float32 if integer_in or data.dtype.itemsize <= 4 else np.float64
    src = data.astype(work_dtype, copy=False)
    if np.allclose(zoom, 1.0) and out_shape == data.shape:
        out = src.copy()
    else:
        # A 1-D matrix makes affine_transform use ndimage's zoom kernel with this exact scale.
        out = ndimage.affine_transform(src, 1.0 / zoom, offset=0.0, output_shape=out_shape,
                                       order=order, mode="nearest", output=work_dtype)
    if integer_in:
        out = np.clip(np.rint(out), INT16_MIN, INT16_MAX).astype(np.int16)
    elif out.dtype != data.dtype:
        out = out.astype(data.dtype)

    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] / zoom[None, :]
    return _new_image(out, new_affine, img)


def realistic_variant(img: nib.Nifti1Image,
                      spacing: tuple[float, float, float] = REALISTIC_SPACING_MM) -> nib.Nifti1Image:
    """A clinical-resolution variant (default 0.8 x 0.8 x 1.5 mm), linear interpolation, int16 data."""
    out = resample_variant(img, spacing, order=1)
    if out.get_data_dtype() != np.int16:
        data = np.clip(np.rint(np.asanyarray(out.dataobj)), INT16_MIN, INT16_MAX).astype(np.int16)
        out = _new_image(data, np.asarray(out.affine), img)
    return out


def write_variant(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Save ``img`` atomically to ``path`` (.nii or .nii.gz); return the path."""
    return atomic_save_nifti(img, path)


# ---- clinical-size multi-tile scans ------------------------------------------------------------------
CLINICAL_SPACING_MM: tuple[float, float, float] = (0.98, 0.98, 2.0)
CLINICAL_INPLANE = 512
CLINICAL_SLICES: tuple[int, ...] = (200, 500)   # 8 and 16 tiles at 3 mm; 1000 (32 tiles) on request
AIR_HU = -1024


@dataclass(frozen=True)
class ClinicalPlan:
    """How ``clinical_variant`` turns a source scan (reoriented to RAS) into a clinical-size one.

    ``resampled_shape``: the source at the target spacing (x, y, z); per axis ``(before, after)`` voxels
    added (> 0: in-plane air padding, centred; along z mirrored copies of the scan, after its last slice)
    or removed (< 0: centred crop); ``shape``/``affine``: the result's header.
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    resampled_shape: tuple[int, int, int]
    pads: tuple[tuple[int, int], ...]
    affine: np.ndarray

    @property
    def name(self) -> str:
        return clinical_name(self.shape)


def clinical_name(shape: tuple[int, int, int]) -> str:
    """File name of a clinical-size scan, e.g. ``clinical_512x512x200.nii.gz``."""
    return "clinical_{}x{}x{}.nii.gz".format(*(int(s) for s in shape))


def _resampled_shape_and_affine(shape, affine, spacing_mm) -> tuple[tuple[int, ...], np.ndarray]:
    """What resample_variant gives for this header, without the data."""
    old = _spacing(affine)
    zoom = old / np.asarray(spacing_mm, dtype=np.float64)
    out_shape = tuple(max(1, int(round(n * z))) for n, z in zip(shape, zoom, strict=True))
    new_affine = np.asarray(affine, dtype=np.float64).copy()
    new_affine[:3, :3] = new_affine[:3, :3] / zoom[None, :]
    return out_shape, new_affine


def plan_clinical(src_shape, src_affine, shape: tuple[int, int, int] = (CLINICAL_INPLANE, CLINICAL_INPLANE, 200),
                  spacing_mm: tuple[float, float, float] = CLINICAL_SPACING_MM) -> ClinicalPlan:
    """Plan a clinical-size variant of a RAS source of ``src_shape`` voxels and affine ``src_affine``.

    The source is resampled to ``spacing_mm`` (linear), then each in-plane axis is padded with air, centred
    (or cropped, centred) to ``shape``; along z the volume is extended by mirroring (np.pad 'symmetric':
    the scan, then it reversed, ...) after its last slice, or cropped, centred. The affine keeps every
    voxel of the source at its world position (a centred pad or crop moves the origin).
    Raises ValueError on a non-positive shape or spacing.
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing_mm)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"clinical shape must be 3 positive voxel counts, got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"clinical spacing must be 3 positive numbers (mm), got {spacing_mm!r}")
    res_shape, affine = _resampled_shape_and_affine(tuple(src_shape[:3]), np.asarray(src_affine), spacing)
    pads = []
    for axis, (have, want) in enumerate(zip(res_shape, shape, strict=True)):
        diff = want - have
        if diff >= 0:
            before = 0 if axis == 2 else diff // 2  # z: mirrored copies after the last slice
            pads.append((before, diff - before))
        else:
            before = -((-diff) // 2)  # crop: remove |before| first voxels, the rest at the end
            pads.append((before, diff - before))
    origin_shift = affine[:3, :3] @ np.asarray([-b for b, _ in pads], dtype=np.float64)
    affine = affine.copy()
    affine[:3, 3] += origin_shift
    return ClinicalPlan(shape=shape, spacing_mm=spacing, resampled_shape=res_shape, pads=tuple(pads),
                        affine=affine)


def clinical_variant(img: nib.Nifti1Image, shape: tuple[int, int, int] = (CLINICAL_INPLANE, CLINICAL_INPLANE, 200),
                     spacing_mm: tuple[float, float, float] = CLINICAL_SPACING_MM) -> nib.Nifti1Image:
    """A clinical-size scan (default 512 x 512 x 200 at 0.98 x 0.98 x 2 mm, int16) made from real CT ``img``:
    reoriented to RAS, resampled (linear), padded in-plane with air and extended along z by mirroring
    (see ``plan_clinical``)."""
    ras = reorient(img, "RAS") if nib.aff2axcodes(img.affine) != ("R", "A", "S") else img
    plan = plan_clinical(ras.shape, ras.affine, shape, spacing_mm)
    data = np.asanyarray(realistic_variant(ras, plan.spacing_mm).dataobj)
    assert data.shape == plan.resampled_shape, (data.shape, plan.resampled_shape)
    crop = tuple(slice(-min(b, 0), n + min(a, 0)) for (b, a), n in zip(plan.pads, data.shape, strict=True))
    data = data[crop]
    inplane = [(max(b, 0), max(a, 0)) for b, a in plan.pads[:2]] + [(0, 0)]
    if any(sum(p) for p in inplane):
        data = np.pad(data, inplane, mode="constant", constant_values=AIR_HU)
    extend = max(plan.pads[2][1], 0)
    if extend:
        data = np.pad(data, [(0, 0), (0, 0), (0, extend)], mode="symmetric")
    data = np.ascontiguousarray(data, dtype=np.int16)
    assert data.shape == plan.shape, (data.shape, plan.shape)
    return _new_image(data, plan.affine, ras)
