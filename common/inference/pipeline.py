"""segment(): the one segmentation pipeline that scripts 04, 05 and 06 share.

Steps and axes: scan (x, y, z) -> closest canonical RAS -> resample to the plans' spacing -> nnU-Net axes
(z, y, x) -> crop to non-zero -> CT normalisation -> sliding window (predict) -> argmax -> uncrop -> (x, y, z)
-> resample back to the canonical shape (order 0) -> undo canonical -> label image with the scan's own
affine and shape.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from common.inference.model import ModelSpec
from common.inference.postprocess import resample_labels_to_shape, uncrop, undo_canonical
from common.inference.preprocess import (
    Crop,
    crop_to_nonzero,
    ct_normalize,
    from_nnunet_axes,
    resample_to_spacing,
    to_canonical_raw,
    to_nnunet_axes,
)
from common.inference.run_config import SegmentOptions
from common.inference.sliding_window import Predict, sliding_window_labels

Refine = Callable[[np.ndarray, nib.Nifti1Image], np.ndarray]  # (3 mm labels (x, y, z), their grid) -> labels


@dataclass
class SegmentResult:
    """Labels in the scan's own grid (x, y, z) plus the low-resolution map and stage timings (seconds)."""

    labels: nib.Nifti1Image
    labels_model_res: nib.Nifti1Image   # canonical, at the model spacing (what passports use by default)
    timings: dict[str, float] = field(default_factory=dict)
    n_tiles: int = 0
    probabilities: tuple | None = None  # (C, z, y, x) float32 and nnU-Net's properties, when asked for


def model_input(canonical: nib.Nifti1Image, spec: ModelSpec, order: int = 1,
                threads: int = 1) -> tuple[np.ndarray, Crop, nib.Nifti1Image]:
    """The network input of a canonical (x, y, z) scan: float32 (1, *spatial) in nnU-Net's axes (z, y, x),
    resampled to the plans' spacing (``order``, ``threads``: see resample_to_spacing), cropped to non-zero
    and CT-normalised; with the crop (for uncrop) and the resampled image (its affine: the model grid)."""
    resampled = resample_to_spacing(canonical, spec.spacing_xyz, order=order, threads=threads)
    data, crop = crop_to_nonzero(to_nnunet_axes(np.asanyarray(resampled.dataobj), spec.transpose_forward))
    return ct_normalize(data, spec.normalization)[None], crop, resampled  # one channel


def segment(img: nib.Nifti1Image, spec: ModelSpec, predict: Predict, options: SegmentOptions | None = None,
            progress=None, refine: Refine | None = None, full_resolution: bool = True,
            probabilities: bool = False) -> SegmentResult:
    """Segment one CT scan (nibabel image) with ``predict`` (see common.inference.predictors).

    ``refine(labels, grid)``, when given, post-processes the model-resolution labels (canonical (x, y, z),
    uint8; ``grid`` the 3 mm image whose affine and zooms they have) before they are resampled back, where
    the official tool runs its --remove_small_blobs. ``full_resolution=False`` skips that resampling (the
    official --save_lowres): ``labels`` is then the model-resolution map in the input's axis order.
    ``probabilities=True`` keeps the class probabilities as nnU-Net exports them (common.inference.probabilities;
    the labels are then their argmax, as there) in ``result.probabilities``: (array, properties)."""
    opt = options or SegmentOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    canonical = to_canonical_raw(img)  # the stored voxels where that is bit-identical: no float64 copy
    data, crop, resampled = model_input(canonical, spec, order=opt.resample_order, threads=opt.resample_threads)
    canonical_shape, canonical_affine = canonical.shape[:3], canonical.affine
    del canonical  # the full-resolution canonical data is not needed past resampling
    t1 = time.perf_counter()
    timings["preprocess"] = t1 - t0

    counter = {"n": 0}

    def count(k: int) -> None:
        counter["n"] += k
        if progress is not None:
            progress(k)

    kept = None
    if probabilities:
        from common.inference.probabilities import nnunet_properties, softmax_and_labels, uncrop_probabilities
        from common.inference.sliding_window import sliding_window_logits

        logits = sliding_window_logits(data, predict, spec.num_classes, spec.patch_size, step=opt.tile_step,
                                       batch_size=opt.batch_size, accumulate=opt.accumulate, progress=count)
        probs, labels = softmax_and_labels(logits)
        del logits
        kept = (uncrop_probabilities(probs, crop, spec.transpose_backward), nnunet_properties(resampled, crop))
        del probs
    else:
        labels = sliding_window_labels(data, predict, spec.num_classes, spec.patch_size, step=opt.tile_step,
                                       batch_size=opt.batch_size, accumulate=opt.accumulate, progress=count)
    t2 = time.perf_counter()
    timings["inference"] = t2 - t1

    labels = from_nnunet_axes(uncrop(labels, crop), spec.transpose_backward)
    if refine is not None:
        labels = refine(np.ascontiguousarray(labels), resampled)
    low = nib.Nifti1Image(np.ascontiguousarray(labels), resampled.affine)
    if not full_resolution:
        out = undo_canonical(np.asanyarray(low.dataobj), resampled.affine, img.affine)
        out.set_data_dtype(np.uint8)
        timings["postprocess"] = time.perf_counter() - t2
        return SegmentResult(labels=out, labels_model_res=low, timings=timings, n_tiles=counter["n"],
                             probabilities=kept)
    full = resample_labels_to_shape(labels, canonical_shape, threads=opt.resample_threads)
    out = undo_canonical(np.ascontiguousarray(full), canonical_affine, img.affine)
    out = nib.Nifti1Image(np.asanyarray(out.dataobj), img.affine)  # exactly the input's affine
    out.set_data_dtype(np.uint8)
    timings["postprocess"] = time.perf_counter() - t2
    return SegmentResult(labels=out, labels_model_res=low, timings=timings, n_tiles=counter["n"],
                         probabilities=kept)
