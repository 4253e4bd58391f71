"""common.sources.variants: reorientation and resampling keep every voxel at its world position."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from common.core.atomic import leftover_temp_files
from common.sources.variants import realistic_variant, reorient, resample_variant, write_variant


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine[:3, :3] @ np.asarray(ijk, dtype=np.float64).T).T + affine[:3, 3]


def _voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(affine)
    return (inv[:3, :3] @ np.asarray(xyz, dtype=np.float64).T).T + inv[:3, 3]


@pytest.fixture(scope="module")
def ct_sm(example_ct_sm) -> nib.Nifti1Image:
    return nib.load(str(example_ct_sm))


@pytest.mark.parametrize("codes", ["LPS", "LAS", "RPI", "SAR", "PIL"])
def test_reorient_keeps_world_positions(ct_sm, codes):
    out = reorient(ct_sm, codes)
    assert "".join(nib.aff2axcodes(out.affine)) == codes
    src = np.asanyarray(ct_sm.dataobj)
    dst = np.asanyarray(out.dataobj)
    assert sorted(dst.shape) == sorted(src.shape)
    assert dst.dtype == src.dtype
    rng = np.random.default_rng(0)
    ijk = np.stack([rng.integers(0, n, 200) for n in src.shape], axis=1)
    ijk2 = _voxel(np.asarray(out.affine), _world(np.asarray(ct_sm.affine), ijk))
    assert np.allclose(ijk2, np.rint(ijk2), atol=1e-3)
    ijk2 = np.rint(ijk2).astype(int)
    assert np.array_equal(src[tuple(ijk.T)], dst[tuple(ijk2.T)])


def test_reorient_lps_flips_x_and_y_and_round_trips(ct_sm):
    lps = reorient(ct_sm, "LPS")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    assert lps.shape == ct_sm.shape
    src = np.asanyarray(ct_sm.dataobj)
    assert np.array_equal(np.asanyarray(lps.dataobj), src[::-1, ::-1, :])
    back = reorient(lps, "RAS")
    assert np.array_equal(np.asanyarray(back.dataobj), src)
    assert np.allclose(back.affine, ct_sm.affine, atol=1e-4)


def test_reorient_rejects_bad_codes(ct_sm):
    with pytest.raises(ValueError):
        reorient(ct_sm, "LLS")
    with pytest.raises(ValueError):
        reorient(ct_sm, "RA")


def _linear_world_image(affine: np.ndarray, shape=(20, 16, 10)) -> nib.Nifti1Image:
    """Float image whose value at each voxel is a linear function of its world coordinate."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = _world(affine, ijk)
    values = (xyz @ np.array([1.0, -2.0, 0.5]) + 7.0).reshape(shape).astype(np.float64)
    return nib.Nifti1Image(values, affine)


@pytest.mark.parametrize("affine", [
    np.diag([3.0, 3.0, 3.0, 1.0]),
    np.array([[-2.0, 0, 0, 40], [0, -2.5, 0, 30], [0, 0, 4.0, -10], [0, 0, 0, 1]]),  # LPS
    np.array([[0, 0, 3.0, 5], [2.0, 0, 0, -4], [0, 2.5, 0, 9], [0, 0, 0, 1]]),  # permuted axes
])
def test_resample_value_follows_world_coordinate(affine):
    img = _linear_world_image(affine)
    out = resample_variant(img, (1.0, 1.2, 1.5), order=1)
    assert np.allclose(np.linalg.norm(out.affine[:3, :3], axis=0), [1.0, 1.2, 1.5], atol=1e-5)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(affine)
    assert np.allclose(out.affine[:3, 3], affine[:3, 3], atol=1e-4)  # centre of voxel 0 unchanged
    old_sp = np.linalg.norm(affine[:3, :3], axis=0)
    expected_shape = tuple(int(round(n * s / t)) for n, s, t in zip(img.shape, old_sp, (1.0, 1.2, 1.5), strict=True))
    assert out.shape == expected_shape
    data = np.asanyarray(out.dataobj)
    assert data.dtype == np.float64
    # Inside the input's voxel-centre box, linear interpolation of a linear field is exact:
    # each output voxel's value is the field at its own world coordinate.
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = _world(np.asarray(out.affine), ijk)
    src_ijk = _voxel(affine, xyz)
    inside = np.all((src_ijk >= -1e-6) & (src_ijk <= np.array(img.shape) - 1 + 1e-6), axis=1)
    assert inside.mean() > 0.8
    expected = xyz @ np.array([1.0, -2.0, 0.5]) + 7.0
    assert np.allclose(data.reshape(-1)[inside], expected[inside], atol=1e-3)
    # Field-of-view length (shape * spacing) preserved to within half an output voxel.
    new_sp = np.array([1.0, 1.2, 1.5])
    assert np.all(np.abs(np.array(out.shape) * new_sp - np.array(img.shape) * old_sp) <= 0.5 * new_sp + 1e-6)


def test_resample_real_ct_same_anatomy(ct_sm):
    out = resample_variant(ct_sm, (0.75, 1.5, 1.0), order=1)
    src = np.asanyarray(ct_sm.dataobj)
    dst = np.asanyarray(out.dataobj)
    assert dst.dtype == np.int16
    assert out.shape == (488, 202, 90)
    # zoom = (4, 2, 3): output voxel (4i, 2j, 3k) lies exactly on input voxel (i, j, k)
    rng = np.random.default_rng(1)
    ijk = np.stack([rng.integers(0, n, 300) for n in src.shape], axis=1)
    out_ijk = np.rint(_voxel(np.asarray(out.affine), _world(np.asarray(ct_sm.affine), ijk))).astype(int)
    assert np.array_equal(out_ijk, ijk * np.array([4, 2, 3]))
    assert np.array_equal(dst[tuple(out_ijk.T)], src[tuple(ijk.T)])


def test_resample_nearest_keeps_labels():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5, 3:8, 4:9] = 7
    img = nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = resample_variant(img, (1.0, 1.0, 1.0), order=0)
    data = np.asanyarray(out.dataobj)
    assert set(np.unique(data)) == {0, 7}
    assert data.dtype == np.int16
    assert data[2 * 3, 2 * 5, 2 * 6] == 7 and data[0, 0, 0] == 0


def test_resample_rejects_bad_spacing_and_2d():
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    for bad in [(0, 1, 1), (-1, 1, 1), (float("nan"), 1, 1), (1, 1)]:
        with pytest.raises(ValueError):
            resample_variant(img, bad)
    with pytest.raises(ValueError):
        resample_variant(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), (1, 1, 1))


def test_realistic_variant_int16_and_written_atomically(ct_sm, tmp_path):
    out = realistic_variant(ct_sm)
    assert out.get_data_dtype() == np.int16
    assert np.allclose(out.header.get_zooms(), (0.8, 0.8, 1.5), atol=1e-5)
    assert out.shape == (458, 379, 60)
    data = np.asanyarray(out.dataobj)
    src = np.asanyarray(ct_sm.dataobj)
    assert data.min() >= src.min() and data.max() <= src.max()  # linear interpolation: no overshoot
    target = tmp_path / "sub" / "ct_realistic.nii.gz"
    assert write_variant(out, target) == target
    back = nib.load(str(target))
    assert back.shape == out.shape and back.get_data_dtype() == np.int16
    assert np.allclose(back.affine, out.affine, atol=1e-5)
    assert np.array_equal(np.asanyarray(back.dataobj), data)
    assert leftover_temp_files(tmp_path) == []


def test_float_input_keeps_float(ct_sm):
    img = nib.Nifti1Image(np.asanyarray(ct_sm.dataobj).astype(np.float32), ct_sm.affine)
    out = resample_variant(img, (1.5, 1.5, 1.5))
    assert np.asanyarray(out.dataobj).dtype == np.float32
