"""Preprocessing as the official fast pipeline does it: canonical, resample, nnU-Net crop + CT normalisation.

Official order (TotalSegmentator 2.18 nnunet.nnUNet_predict_image + nnU-Net's DefaultPreprocessor):
get_fdata (float64) -> as_closest_canonical -> change_spacing(order=1, dtype=int32) -> [file] ->
transpose to nnU-Net axes (z, y, x) -> crop_to_nonzero -> CTNormalization (float32).

``to_canonical_raw`` skips the full-resolution float64 copy where it changes nothing (issue 27, item 5): scipy's
zoom reads every input value as a double, so zooming the stored int16 (or float32) voxels directly, into a
float64 output, gives the same doubles as zooming their float64 copy. That holds when the stored values are the
values (no scl_slope/scl_inter scaling); otherwise the float64 copy is made as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.inference.model import Normalization


def to_canonical(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Float64 copy of the scan reoriented to the closest RAS+ axes (what the official tool feeds nnU-Net).
    The float64 array is not cached in ``img`` (caching="unchanged"): callers drop it once resampled."""
    return nib.as_closest_canonical(nib.Nifti1Image(img.get_fdata(caching="unchanged"), img.affine))


def to_canonical_raw(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """``to_canonical`` without the float64 copy: the scan's stored voxels (views where possible) reoriented to
    the closest RAS+ axes, when they equal get_fdata()'s values (no scaling; integer or float data); else
    ``to_canonical``. Resampled by ``resample_to_spacing`` (float64 output), the result is bit-identical."""
    proxy = img.dataobj
    if nib.is_proxy(proxy):
        exact = float(getattr(proxy, "slope", 1.0)) == 1.0 and float(getattr(proxy, "inter", 0.0)) == 0.0
        dtype = np.dtype(proxy.dtype)
    else:  # an in-memory array: get_fdata() only casts it
        exact, dtype = True, np.asanyarray(proxy).dtype
    if not exact or dtype.kind not in "iuf":
        return to_canonical(img)
    return nib.as_closest_canonical(nib.Nifti1Image(np.asanyarray(proxy), img.affine))


def zoom_volume(data: np.ndarray, zoom: np.ndarray, order: int, threads: int = 1,
                output: type | None = None) -> np.ndarray:
    """scipy.ndimage.zoom(mode='nearest') of an (x, y, z) array, optionally split over ``threads``; the result's
    dtype is ``output`` (default: the input's). The interpolation is in double whatever the input's dtype, so an
    int16 input zoomed into float64 gives the same result as its float64 copy (``to_canonical_raw``).

    The split is along x in output space; each chunk is computed with the coordinates that zoom uses
    for the whole array (grid_mode=False: in = out * (n_in - 1) / (n_out - 1)), so the result equals the
    single-call result up to float rounding. Written by hand because scipy's zoom is single-threaded.
    """
    zoom = np.asarray(zoom, dtype=np.float64)
    out_shape = tuple(int(round(s * z)) for s, z in zip(data.shape, zoom, strict=True))
    if threads <= 1 or out_shape[0] < 2 * threads:
        return ndimage.zoom(data, zoom, order=order, mode="nearest", output=output or data.dtype)
    from concurrent.futures import ThreadPoolExecutor

    scale = [(i - 1) / (o - 1) if o > 1 else 0.0 for i, o in zip(data.shape, out_shape, strict=True)]
    bounds = np.linspace(0, out_shape[0], threads + 1).astype(int)
    out = np.empty(out_shape, dtype=output or data.dtype)

    def work(k: int) -> None:
        a, b = bounds[k], bounds[k + 1]
        # map_coordinates over the separable grid via affine_transform (diagonal matrix + offset)
        offset = (a * scale[0], 0.0, 0.0)
        out[a:b] = ndimage.affine_transform(data, scale, offset=offset, output_shape=(b - a, *out_shape[1:]),
                                            order=order, mode="nearest", output=out.dtype)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return out


def resample_to_spacing(img: nib.Nifti1Image, spacing_xyz: tuple[float, float, float], order: int = 1,
                        threads: int = 1, cast_int32: bool = True) -> nib.Nifti1Image:
    """TotalSegmentator's change_spacing(img, spacing, order, dtype=int32) for a canonical (x, y, z) image.

    Returns the image unchanged when its header spacing already equals the target (as the official code).
    Otherwise zooms by header_spacing / target; the affine's columns are divided by the zoom, so the world
    position of voxel (0, 0, 0) is kept. The official code truncates the result to int32; ``cast_int32``
    keeps that (HU are integers in CT files) or returns float32.
    """
    old_spacing = np.array(img.header.get_zooms()[:3])
    new_spacing = np.array(spacing_xyz, dtype=np.float64)
    if np.array_equal(old_spacing, new_spacing):
        return img
    zoom = old_spacing / new_spacing
    data = np.asanyarray(img.dataobj)
    out = zoom_volume(data, zoom, order=order, threads=threads, output=np.float64)
    out = out.astype(np.int32) if cast_int32 else out.astype(np.float32)
    affine = np.array(img.affine, dtype=np.float64)
    affine[:3, :3] = affine[:3, :3] / zoom[None, :]
    return nib.Nifti1Image(out, affine)


def to_nnunet_axes(data_xyz: np.ndarray, transpose_forward: tuple[int, ...]) -> np.ndarray:
    """nibabel (x, y, z) -> nnU-Net's (z, y, x) (SimpleITK reader order) -> plans' transpose_forward."""
    return np.ascontiguousarray(data_xyz.transpose(2, 1, 0).transpose(transpose_forward))


def from_nnunet_axes(data: np.ndarray, transpose_backward: tuple[int, ...]) -> np.ndarray:
    """Inverse of to_nnunet_axes: plans' axes -> (z, y, x) -> nibabel (x, y, z)."""
    return data.transpose(transpose_backward).transpose(2, 1, 0)


@dataclass(frozen=True)
class Crop:
    """Bounding box (half-open, nnU-Net axes) that nnU-Net crops to, and the shape before cropping."""

    slices: tuple[slice, ...]
    shape_before: tuple[int, ...]


def crop_to_nonzero(data: np.ndarray) -> tuple[np.ndarray, Crop]:
    """nnU-Net's crop_to_nonzero for one channel: bbox of binary_fill_holes(data != 0)."""
    mask = ndimage.binary_fill_holes(data != 0)
    if not mask.any():
        slices = tuple(slice(0, s) for s in data.shape)
    else:
        slices = ndimage.find_objects(mask.astype(np.uint8))[0]
    return data[slices], Crop(slices=tuple(slices), shape_before=tuple(data.shape))


def ct_normalize(data: np.ndarray, norm: Normalization) -> np.ndarray:
    """nnU-Net CTNormalization in float32: clip to [lower, upper] HU, subtract mean, divide by std."""
    if norm.scheme != "CTNormalization":
        raise ValueError(f"normalisation scheme {norm.scheme} is not implemented (only CTNormalization)")
    out = data.astype(np.float32, copy=True)
    np.clip(out, norm.lower, norm.upper, out=out)
    out -= norm.mean
    out /= max(norm.std, 1e-8)
    return out
