"""common.imaging.validation: one test per bad input; each error names the file and the problem in one line."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.core.errors import InputError
from common.imaging.validation import (
    available_memory_bytes,
    check_label_map_matches,
    check_memory,
    check_min_size,
    estimate_memory_bytes,
    load_scan,
    validate_image,
)

FAST_SPACING = (3.0, 3.0, 3.0)
FAST_PATCH_XYZ = (128, 112, 112)
FAST_CLASSES = 118


def assert_one_line(exc: pytest.ExceptionInfo | str, path: Path | str | None, *words: str) -> str:
    msg = exc if isinstance(exc, str) else str(exc.value)
    assert "\n" not in msg and "\r" not in msg, msg
    if path is not None:
        assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def ct_img(example_ct_sm) -> nib.Nifti1Image:
    img = nib.load(str(example_ct_sm))
    return nib.Nifti1Image(np.asanyarray(img.dataobj)[20:60, 20:60, 5:25], img.affine)


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, str(path))
    return path


def _write_raw(tmp_path: Path, name: str, img: nib.Nifti1Image, mutate) -> Path:
    """Write ``img`` as .nii.gz with its on-disk header changed by ``mutate`` (bypassing nibabel's fixes)."""
    plain = _save(img, tmp_path / "plain.nii")
    raw = plain.read_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    mutate(hdr)
    out = tmp_path / name
    out.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    plain.unlink()
    return out


# ---- files ----------------------------------------------------------------------------------
def test_good_ct_passes_without_warnings(example_ct, example_ct_sm):
    for path in (example_ct, example_ct_sm):
        vol, warnings = load_scan(path)
        assert warnings == []
        assert vol.shape[:2] == (122, 101)
        assert isinstance(vol.image.dataobj, np.ndarray)  # data read once, held in memory


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "not found")


def test_text_file_named_nii_gz(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not a scan\nsecond line\n", encoding="utf-8")
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "not a readable NIfTI")


def test_non_nifti_extension(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "not a NIfTI file")


def test_truncated_nii_gz(tmp_path, example_ct):
    path = tmp_path / "cut.nii.gz"
    raw = example_ct.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "truncated or corrupt")


def test_truncated_plain_nii(tmp_path, ct_img):
    full = _save(ct_img, tmp_path / "full.nii")
    path = tmp_path / "cut.nii"
    path.write_bytes(full.read_bytes()[:5000])
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "truncated or corrupt")


# ---- dimensions -----------------------------------------------------------------------------
def test_2d_image(tmp_path, ct_img):
    path = _save(nib.Nifti1Image(np.asanyarray(ct_img.dataobj)[:, :, 3], ct_img.affine), tmp_path / "slice.nii.gz")
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "2D image", "3D volume is needed")


def test_4d_image_with_several_volumes(tmp_path, ct_img):
    data = np.asanyarray(ct_img.dataobj)
    path = _save(nib.Nifti1Image(np.stack([data, data, data], axis=-1), ct_img.affine), tmp_path / "series.nii.gz")
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "4D image with 3 volumes")


def test_4d_single_volume_is_squeezed(tmp_path, ct_img):
    data = np.asanyarray(ct_img.dataobj)
    path = _save(nib.Nifti1Image(data[..., None], ct_img.affine), tmp_path / "one.nii.gz")
    vol, warnings = load_scan(path)
    assert vol.shape == data.shape
    assert np.array_equal(np.asanyarray(vol.image.dataobj), data)
    assert len(warnings) == 1
    assert_one_line(warnings[0], path, "single volume", "treated as 3D")


def test_tiny_scan_is_an_error(tmp_path, ct_img):
    path = _save(nib.Nifti1Image(np.asanyarray(ct_img.dataobj)[:, :, 3:4], ct_img.affine), tmp_path / "thin.nii.gz")
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "only 1 voxel", "along z")


def test_scan_smaller_than_a_patch_is_allowed(tmp_path, ct_img):
    path = _save(ct_img, tmp_path / "small.nii.gz")
    vol, warnings = load_scan(path)
    assert warnings == []
    notes = check_min_size(path, vol.shape, vol.spacing, target_spacing_mm=FAST_SPACING, patch_size_xyz=FAST_PATCH_XYZ)
    assert len(notes) == 1
    assert_one_line(notes[0], path, "smaller than one model patch", "padded")
    assert check_min_size(path, (200, 200, 200), (3, 3, 3), target_spacing_mm=FAST_SPACING,
                          patch_size_xyz=FAST_PATCH_XYZ) == []


# ---- spacing / affine -----------------------------------------------------------------------
def _set_pixdim_x(value):
    def mutate(hdr):
        hdr["pixdim"][1] = value
    return mutate


@pytest.mark.parametrize("value, words", [
    (0.0, ("zero along x",)),
    (-3.0, ("negative along x",)),
    (float("nan"), ("nan along x",)),
    (float("inf"), ("inf along x",)),
])
def test_bad_header_spacing(tmp_path, ct_img, value, words):
    # nibabel would "fix" these on load (abs / 1 mm) or keep NaN; the raw header check catches all.
    path = _write_raw(tmp_path, "bad_pixdim.nii.gz", ct_img, _set_pixdim_x(value))
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "voxel size", *words)


def test_bad_header_spacing_qform_only(tmp_path, ct_img):
    def mutate(hdr):
        hdr["sform_code"] = 0
        hdr["qform_code"] = 1
        hdr["pixdim"][3] = 0.0
    path = _write_raw(tmp_path, "qform_zero.nii.gz", ct_img, mutate)
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "zero along z")


def test_zero_affine_column(tmp_path, ct_img):
    def mutate(hdr):
        hdr["srow_y"][:3] = 0.0
        hdr["sform_code"] = 2
    path = _write_raw(tmp_path, "zero_col.nii.gz", ct_img, mutate)
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "zero voxel size along y")


def test_nan_affine(tmp_path, ct_img):
    def mutate(hdr):
        hdr["srow_x"][3] = np.nan
        hdr["sform_code"] = 2
    path = _write_raw(tmp_path, "nan_aff.nii.gz", ct_img, mutate)
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "NaN or inf")


def test_singular_affine(tmp_path, ct_img):
    affine = np.array([[3.0, 3.0, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])  # x and y columns parallel
    img = nib.Nifti1Image(np.asanyarray(ct_img.dataobj), affine)
    with pytest.raises(InputError) as exc:
        validate_image(img, "inmem.nii.gz")
    assert_one_line(exc, "inmem.nii.gz", "singular")


def test_header_zooms_vs_affine_mismatch_warns(ct_img):
    img = nib.Nifti1Image(np.asanyarray(ct_img.dataobj), ct_img.affine)
    img.header.set_zooms((1.0, 3.0, 3.0))
    warnings = validate_image(img, "mismatch.nii.gz")
    assert len(warnings) == 1
    assert_one_line(warnings[0], "mismatch.nii.gz", "differs from the affine")


# ---- voxel values ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_voxels(tmp_path, ct_img, bad, word):
    data = np.asanyarray(ct_img.dataobj).astype(np.float32)
    data[5, 6, 7] = bad
    data[1, 2, 3] = bad
    path = _save(nib.Nifti1Image(data, ct_img.affine), tmp_path / "nonfinite.nii.gz")
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, f"2 {word} voxel")


def test_all_constant_scan(tmp_path, ct_img):
    path = _save(nib.Nifti1Image(np.full(ct_img.shape, -1024, np.int16), ct_img.affine), tmp_path / "blank.nii.gz")
    with pytest.raises(InputError) as exc:
        load_scan(path)
    assert_one_line(exc, path, "same value (-1024)")


def test_mr_given_as_ct_warns(example_mr_sm):
    vol, warnings = load_scan(example_mr_sm)
    assert len(warnings) == 1
    assert_one_line(warnings[0], example_mr_sm, "do not look like CT", "MR")
    _, mr_warnings = load_scan(example_mr_sm, modality="MR")
    assert mr_warnings == []


# ---- memory ---------------------------------------------------------------------------------
def test_memory_estimate_and_huge_scan():
    shape, spacing = (512, 512, 2000), (0.7, 0.7, 0.5)
    est = estimate_memory_bytes(shape, spacing, FAST_SPACING, FAST_CLASSES, FAST_PATCH_XYZ)
    n = 512 * 512 * 2000
    m = 128 * 119 * 333  # x padded up to the patch
    window = 128 * 119 * 112  # the logit sums of one row of tiles (slab-wise argmax)
    patch = 128 * 112 * 112
    assert est == n * 8 + m * 4 + FAST_CLASSES * window * 2 + FAST_CLASSES * patch * 4 + 2048 * patch + 2 * n
    path = "huge.nii.gz"
    with pytest.raises(InputError) as exc:
        check_memory(path, est, available=2 * 1024**3)
    msg = assert_one_line(exc, path, "needs ~", "GiB available", "crop the scan")
    assert "2.0 GiB available" in msg
    check_memory(path, est, available=est)  # exactly enough: fine
    # a small scan is padded up to a patch at model resolution
    small = estimate_memory_bytes((10, 10, 10), (3, 3, 3), FAST_SPACING, 2, FAST_PATCH_XYZ)
    assert small == 1000 * 10 + int(np.prod(FAST_PATCH_XYZ)) * (4 + 2 * 2 + 2 * 4 + 2048)


def test_available_memory_is_read():
    avail = available_memory_bytes()
    assert avail is None or avail > 0


# ---- label maps -----------------------------------------------------------------------------
def test_label_map_matches(ct_img):
    labels = nib.Nifti1Image(np.zeros(ct_img.shape, np.uint8), ct_img.affine)
    check_label_map_matches(ct_img, labels, "scan.nii.gz", "labels.nii.gz")


def test_label_map_shape_mismatch(ct_img):
    labels = nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), ct_img.affine)
    with pytest.raises(InputError) as exc:
        check_label_map_matches(ct_img, labels, "scan.nii.gz", "labels.nii.gz")
    assert_one_line(exc, "labels.nii.gz", "scan.nii.gz", "shape 10x10x10")


def test_label_map_affine_mismatch(ct_img):
    affine = np.array(ct_img.affine, dtype=np.float64)
    affine[0, 3] += 1.5
    labels = nib.Nifti1Image(np.zeros(ct_img.shape, np.uint8), affine)
    with pytest.raises(InputError) as exc:
        check_label_map_matches(ct_img, labels, "scan.nii.gz", "labels.nii.gz")
    assert_one_line(exc, "labels.nii.gz", "scan.nii.gz", "affine does not match")
