"""Label map back to the scan: uncrop, axes back to (x, y, z), resample (order 0), undo canonical."""
from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from common.inference.preprocess import Crop, zoom_volume


def uncrop(labels: np.ndarray, crop: Crop) -> np.ndarray:
    """Insert a cropped label map into zeros of the pre-crop shape (nnU-Net's insert_crop_into_image)."""
    out = np.zeros(crop.shape_before, dtype=labels.dtype)
    out[crop.slices] = labels
    return out


def resample_labels_to_shape(labels: np.ndarray, shape_xyz: tuple[int, ...], threads: int = 1) -> np.ndarray:
    """Nearest-neighbour (order 0) zoom of an (x, y, z) label map to ``shape_xyz``, as TotalSegmentator's
    change_spacing(target_shape=..., order=0) does (scipy.ndimage.zoom, mode='nearest')."""
    if tuple(labels.shape) == tuple(shape_xyz):
        return labels
    zoom = np.array(shape_xyz, dtype=np.float64) / np.array(labels.shape, dtype=np.float64)
    return zoom_volume(labels, zoom, order=0, threads=threads)


def undo_canonical(labels_canonical: np.ndarray, canonical_affine: np.ndarray,
                   original_affine: np.ndarray) -> nib.Nifti1Image:
    """Reorient a label map from closest-canonical (RAS) axes back to the original file's axes."""
    img = nib.Nifti1Image(labels_canonical, canonical_affine)
    from_canonical = ornt_transform(axcodes2ornt("RAS"), io_orientation(original_affine))
    return img.as_reoriented(from_canonical)
