"""Outputs exactly as TotalSegmentator writes them (read from totalsegmentator/nnunet.py, 2.18), so that a
workflow written for ``TotalSegmentator --fast`` reads ours unchanged.

- The header is the input's own (qform/sform codes, units, description) with dtype uint8; the affine is the
  input's (our labels are in the input's grid).
- Default: one binary mask per class, ``<out>/<class name>.nii.gz`` (all classes, or the --roi_subset ones).
- ``--ml``: one label map at ``<out file>``, the input header plus the label-map extension that
  TotalSegmentator's ``load_multilabel_nifti`` reads (``nifti_ext_header.add_label_map_to_nifti``, called
  here so that the XML is the official one byte for byte).
- Statistics: TotalSegmentator's own ``statistics.get_basic_statistics`` (volume in mm³, mean intensity in HU,
  0 for a structure touching the border) on the 3 mm labels and the 3 mm resampled CT, as its fast mode does.
Every file is written atomically (common.core.atomic).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from common.core.atomic import atomic_save_nifti, atomic_write_json


def official_header(input_img: nib.Nifti1Image) -> nib.Nifti1Header:
    """The input's header with dtype uint8 (what the official tool gives every mask)."""
    header = nib.Nifti1Header.from_header(input_img.header) if not isinstance(input_img.header, nib.Nifti1Header) \
        else input_img.header.copy()
    header.set_data_dtype(np.uint8)
    header.extensions.clear()
    return header


def subset_map(label_map: dict[int, str], roi_subset: Sequence[str] | None) -> dict[int, str]:
    """``label_map`` restricted to the names in ``roi_subset`` (all classes when None)."""
    return dict(label_map) if roi_subset is None else {k: v for k, v in label_map.items() if v in set(roi_subset)}


def write_class_masks(labels: np.ndarray, input_img: nib.Nifti1Image, label_map: dict[int, str], out_dir: Path,
                      threads: int = 1) -> list[Path]:
    """One binary uint8 mask per class of ``label_map``: ``<out_dir>/<name>.nii.gz`` (labels (x, y, z) in the
    input's grid). ``threads`` masks are compressed at once (zlib releases the GIL).

    Masks are built in Fortran order, NIfTI's order on disk, so that nibabel writes them without reordering
    (a C-ordered 512x512x200 volume takes ~4x longer to save), and each class is compared only inside its
    bounding box (scipy.ndimage.find_objects, one pass over the labels); outside it the mask is 0."""
    from scipy import ndimage

    out_dir.mkdir(parents=True, exist_ok=True)
    header = official_header(input_img)
    affine = np.asarray(input_img.affine, dtype=np.float64)
    labels = np.asfortranarray(labels)
    boxes = ndimage.find_objects(labels, max_label=max(label_map, default=0)) if labels.dtype.kind in "iu" else None

    def one(item: tuple[int, str]) -> Path:
        k, name = item
        if boxes is None:
            mask = np.asfortranarray(labels == k, dtype=np.uint8)
        else:
            mask = np.zeros(labels.shape, np.uint8, order="F")
            box = boxes[k - 1] if 0 < k <= len(boxes) else None
            if box is not None:
                mask[box] = labels[box] == k
        return atomic_save_nifti(nib.Nifti1Image(mask, affine, header), out_dir / f"{name}.nii.gz")

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(one, label_map.items()))


def multilabel_image(labels: np.ndarray, input_img: nib.Nifti1Image, label_map: dict[int, str]) -> nib.Nifti1Image:
    """The label map as the official tool returns and writes it: (x, y, z) uint8, classes outside ``label_map``
    set to 0, ``input_img``'s affine and header, and the official label-map header extension."""
    from totalsegmentator.nifti_ext_header import add_label_map_to_nifti

    data = np.asfortranarray(labels, dtype=np.uint8)  # NIfTI's order on disk: saved without reordering
    if set(np.unique(data)) - {0, *label_map}:
        data = data * np.isin(data, list(label_map)).astype(np.uint8)
    img = nib.Nifti1Image(data, np.asarray(input_img.affine, dtype=np.float64), official_header(input_img))
    return add_label_map_to_nifti(img, label_map)


def write_multilabel(labels: np.ndarray, input_img: nib.Nifti1Image, label_map: dict[int, str],
                     target: Path) -> Path:
    """multilabel_image(labels, input_img, label_map) saved (atomically) at ``target``."""
    return atomic_save_nifti(multilabel_image(labels, input_img, label_map), target)


def statistics(labels_model_res: nib.Nifti1Image, ct_model_res: nib.Nifti1Image, roi_subset: Sequence[str] | None,
               *, exclude_masks_at_border: bool = True, metric: str = "mean",
               normalized_intensities: bool = False) -> dict[str, dict[str, float]]:
    """TotalSegmentator's fast-mode statistics: {class name: {"volume": mm³, "intensity": HU}} computed by its
    own get_basic_statistics on the 3 mm canonical labels and the 3 mm resampled CT (same grid)."""
    from totalsegmentator.statistics import get_basic_statistics

    return get_basic_statistics(np.asanyarray(labels_model_res.dataobj), ct_model_res, None, quiet=True,
                                task="total", exclude_masks_at_border=exclude_masks_at_border,
                                roi_subset=list(roi_subset) if roi_subset is not None else None, metric=metric,
                                normalized_intensities=normalized_intensities)


def min_nifti_bytes(n_voxels: int, n_images: int) -> int:
    """A lower bound of the bytes ``n_images`` gzipped uint8 NIfTI images of ``n_voxels`` voxels take as nibabel
    writes them: no image compresses further than all zeros do at nibabel's gzip level (measured on 8 MiB of
    zeros here, not assumed; 90 % of it, for the gzip framing of smaller files), plus the 352-byte header. Class
    masks are nearly all zeros, so for a mask set this is near the real size; a label map takes more."""
    return n_images * (int(0.9 * n_voxels * _zero_bytes_per_voxel()) + 352)


@functools.cache
def _zero_bytes_per_voxel() -> float:
    """Bytes per voxel of gzipped zeros at nibabel's level, measured once per process on 8 MiB."""
    import gzip

    from nibabel.openers import Opener

    sample = 8 << 20
    return len(gzip.compress(bytes(sample), compresslevel=Opener.default_compresslevel)) / sample


def write_statistics(stats: dict, target: Path) -> Path:
    """statistics.json as the official tool writes it (indent 4), atomically."""
    return atomic_write_json(target, stats, indent=4)
