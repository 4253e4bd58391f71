"""Every bad input in one folder next to a good scan: 06 records each with a one-line error naming the
file and the problem, finishes the good scan, and exits non-zero. The MR scan is a warning, not an error."""
from __future__ import annotations

import gzip
import importlib
import io

import nibabel as nib
import numpy as np
import pytest

from common.records.results import read_result

pytestmark = pytest.mark.slow


def _raw_with(img: nib.Nifti1Image, path, mutate) -> None:
    """Write .nii.gz with the on-disk header changed by ``mutate`` (nibabel would 'fix' it on save)."""
    raw = img.to_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    mutate(hdr)
    path.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))


@pytest.fixture(scope="module")
def batch(tmp_path_factory, example_ct, example_mr_sm):
    d = tmp_path_factory.mktemp("bad_batch")
    ct = nib.load(example_ct)
    good = ct.slicer[40:80, 30:70, 40:64]
    data = np.asanyarray(good.dataobj).astype(np.float32)
    nib.save(good, d / "a_good.nii.gz")
    (d / "garbage.nii.gz").write_bytes(b"not a nifti")
    (d / "notes.txt").write_text("not an image", encoding="utf-8")
    full = gzip.compress(good.to_bytes())
    (d / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    nib.save(nib.Nifti1Image(data[:, :, 0], good.affine), d / "flat_2d.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), good.affine), d / "four_d.nii.gz")

    def zero_x(h):
        h["pixdim"][1] = 0.0

    def nan_y(h):
        h["pixdim"][2] = np.nan

    def neg_z(h):
        h["pixdim"][3] = -3.0

    _raw_with(good, d / "zero_spacing.nii.gz", zero_x)
    _raw_with(good, d / "nan_spacing.nii.gz", nan_y)
    _raw_with(good, d / "negative_spacing.nii.gz", neg_z)
    nanvox = data.copy()
    nanvox[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(nanvox, good.affine), d / "nan_voxels.nii.gz")
    nib.save(nib.Nifti1Image(np.full(data.shape, -1000, np.int16), good.affine), d / "constant.nii.gz")
    nib.save(nib.Nifti1Image(data[:, :, :1], good.affine), d / "one_slice.nii.gz")
    rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, good.affine), d / "rgb.nii.gz")
    micro = good.affine.copy()
    micro[:3, :3] /= 3000  # voxel sizes of 0.001 mm: a header in the wrong unit
    nib.save(nib.Nifti1Image(data, micro), d / "micro_voxels.nii.gz")
    nib.save(nib.load(example_mr_sm), d / "mr_as_ct.nii.gz")
    return d


EXPECTED_ERRORS = {
    "garbage": "not a readable NIfTI",
    "notes.txt": "not a NIfTI file",
    "truncated": "truncated or corrupt",
    "flat_2d": "2D image",
    "four_d": "4D image with 2 volumes",
    "zero_spacing": "zero",
    "nan_spacing": "nan",
    "negative_spacing": "negative",
    "nan_voxels": "NaN",
    "constant": "constant",
    "one_slice": "voxel",
    "rgb": "RGB",
    "micro_voxels": "less than one 3 mm model voxel",
}


def test_06_reports_every_bad_input_and_finishes_the_good_scans(batch, tmp_path, tiny_onnx_model, in_tiny_home):
    from common.inference.run_config import RunConfig, save_config

    cfg = save_config(RunConfig(), tmp_path / "config.json")  # independent of any local 05 result
    mod = importlib.import_module("06_inferenceAndPassport")
    code = mod.main(["--input", str(batch), "--out", str(tmp_path / "out"), "--result", str(tmp_path / "r.json"),
                     "--onnx", str(tiny_onnx_model), "--config", str(cfg), "--weights", "standin"])
    assert code == 1
    res = read_result(tmp_path / "r.json")
    by_name = {s["file"].split("/")[-1].replace(".nii.gz", ""): s for s in res["scans"]}
    assert by_name["a_good"]["status"] == "ok" and (tmp_path / "out" / "a_good_seg.nii.gz").exists()
    mr = by_name["mr_as_ct"]
    assert mr["status"] == "ok" and any("CT" in w for w in mr["warnings"])  # warned, still segmented
    for name, words in EXPECTED_ERRORS.items():
        rec = by_name[name]
        assert rec["status"] == "failed", name
        err = rec["error"]
        assert "\n" not in err and name in err and words.lower() in err.lower(), (name, err)
    assert res["summary"]["n_failed"] == len(EXPECTED_ERRORS)
