"""segment() returns a label image with the input's shape, affine and orientation (RAS, LPS, anisotropic)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from common.inference.pipeline import segment
from common.sources.variants import reorient, resample_variant


@pytest.fixture(scope="module")
def small_ct(example_ct):
    """A 60 x 50 x 20 voxel crop of the real CT (3 mm) with its true affine: one tile, fast."""
    img = nib.load(example_ct)
    return img.slicer[30:90, 25:75, 40:60]


@pytest.mark.parametrize("variant", ["RAS", "LPS", "anisotropic", "PIR"])
def test_output_keeps_input_geometry(variant, small_ct, model_spec, ort_predictor):
    img = small_ct
    if variant == "LPS":
        img = reorient(img, "LPS")
    elif variant == "PIR":
        img = reorient(img, "PIR")
    elif variant == "anisotropic":
        img = reorient(resample_variant(img, (2.0, 2.5, 5.0), order=1), "LAS")
    res = segment(img, model_spec, ort_predictor)
    out = res.labels
    assert out.shape == img.shape
    np.testing.assert_allclose(out.affine, img.affine, atol=1e-6)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(img.affine)
    assert out.get_data_dtype() == np.uint8
    assert set(res.timings) == {"preprocess", "inference", "postprocess"}


def test_orientation_does_not_change_the_anatomy(small_ct, model_spec, ort_predictor):
    """The same scan stored RAS or LPS gets the same labels at the same world positions."""
    ras = np.asanyarray(segment(small_ct, model_spec, ort_predictor).labels.dataobj)
    lps_img = reorient(small_ct, "LPS")
    lps = segment(lps_img, model_spec, ort_predictor).labels
    back = np.asanyarray(reorient(lps, "RAS").dataobj)
    assert np.array_equal(ras, back)
