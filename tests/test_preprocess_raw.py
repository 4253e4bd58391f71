"""Issue 27, item 5: preprocessing without the full-resolution float64 copy gives bit-identical network input.

The official order reads the scan with get_fdata (float64), reorients it and zooms it; ``to_canonical_raw``
zooms the stored int16 voxels directly into float64. On the shared CT, a reoriented copy, a clinical-size
variant (0.98 x 0.98 x 2 mm, resampled to 3 mm) and a scaled file (scl_slope: the float64 path is kept),
the network input, the crop and the resampled grid must be equal to the last bit, on 1 and 2 resampling threads.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from common.inference.pipeline import model_input
from common.inference.preprocess import to_canonical, to_canonical_raw
from common.sources.variants import clinical_variant, reorient


def _same_input(img: nib.Nifti1Image, spec, threads: int = 1) -> None:
    a, crop_a, res_a = model_input(to_canonical(img), spec, threads=threads)
    b, crop_b, res_b = model_input(to_canonical_raw(img), spec, threads=threads)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))  # bit for bit
    assert crop_a == crop_b and np.array_equal(res_a.affine, res_b.affine)


def _saved(img: nib.Nifti1Image, path) -> nib.Nifti1Image:
    nib.save(img, path)
    return nib.load(path)


def test_shared_ct_and_a_reoriented_copy(tmp_path, example_ct, example_ct_sm, model_spec):
    img = nib.load(example_ct_sm)
    assert not np.issubdtype(to_canonical_raw(img).get_data_dtype(), np.floating)  # no float64 copy
    _same_input(img, model_spec)
    _same_input(nib.load(example_ct), model_spec)
    _same_input(_saved(reorient(img, "LPS"), tmp_path / "lps.nii.gz"), model_spec, threads=2)


@pytest.mark.parametrize("threads", [1, 2])
def test_clinical_size_variant(tmp_path, example_ct, model_spec, threads):
    img = _saved(clinical_variant(nib.load(example_ct), shape=(512, 512, 120)), tmp_path / "clinical.nii.gz")
    assert img.get_data_dtype() == np.int16
    _same_input(img, model_spec, threads=threads)


def test_scaled_data_keeps_the_float64_path(tmp_path, example_ct_sm, model_spec):
    img = nib.load(example_ct_sm)
    scaled = nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.int16), img.affine)
    scaled.header.set_slope_inter(0.5, -10.0)  # stored values are not the values
    loaded = _saved(scaled, tmp_path / "scaled.nii.gz")
    assert to_canonical_raw(loaded).get_data_dtype() == np.float64
    _same_input(loaded, model_spec)
