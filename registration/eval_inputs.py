"""The scans evaluate.py measures on: the shared CT with each of its real label maps, and a clinical-size variant.

The shared CT example (3 mm) has two real label maps on its grid: the 1.5 mm model's (example_seg, 41 classes)
and the fast model's (example_seg_fast, 40 classes). The clinical-size variant is made at run time, as
common.sources.variants.clinical_variant makes 01_download_data.py --clinical's scans: the CT resampled to
0.98 x 0.98 x 2 mm (linear) and padded with air to 512 x 512 in-plane; here along z it keeps the scan's own
extent (no mirrored copies: those would repeat the anatomy). Its label map is the label map resampled the same
way with nearest neighbours (scipy, order 0) and padded with background. Arrays (x, y, z), affines voxel ->
world mm (RAS+).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from common.imaging.labels import checked_label_array
from common.sources.variants import (
    CLINICAL_INPLANE,
    CLINICAL_SPACING_MM,
    clinical_variant,
    plan_clinical,
    reorient,
    resample_variant,
)
from registration.inputs import load_checked_scan


def clinical_case(ct_path: Path, seg_path: Path, inplane: int = CLINICAL_INPLANE,
                  spacing_mm: tuple[float, float, float] = CLINICAL_SPACING_MM
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(image float32, labels int32, affine, name) of the clinical-size variant of a CT and its label map
    (module docstring); the name is e.g. ``clinical_512x512x45``. Bad files: InputError (one line)."""
    ct = load_checked_scan(ct_path).image
    seg = load_checked_scan(seg_path, modality="ANY").image
    if nib.aff2axcodes(ct.affine) != ("R", "A", "S"):
        ct, seg = reorient(ct, "RAS"), reorient(seg, "RAS")
    n_z = plan_clinical(ct.shape, ct.affine, (inplane, inplane, 1), spacing_mm).resampled_shape[2]
    plan = plan_clinical(ct.shape, ct.affine, (inplane, inplane, n_z), spacing_mm)
    image = clinical_variant(ct, plan.shape, spacing_mm)
    lab = np.asanyarray(resample_variant(seg, spacing_mm, order=0).dataobj)
    crop = tuple(slice(-min(b, 0), n + min(a, 0)) for (b, a), n in zip(plan.pads, lab.shape, strict=True))
    lab = np.pad(lab[crop], [(max(b, 0), max(a, 0)) for b, a in plan.pads], mode="constant", constant_values=0)
    if lab.shape != image.shape or not np.allclose(image.affine, plan.affine):
        raise ValueError(f"clinical variant: labels {lab.shape} do not match the scan {image.shape}")
    labels = checked_label_array(lab, seg_path, ndim=3, negative_as_background=True).astype(np.int32)
    name = "clinical_{}x{}x{}".format(*plan.shape)
    return np.asarray(image.dataobj, dtype=np.float32), labels, np.asarray(plan.affine, dtype=np.float64), name
