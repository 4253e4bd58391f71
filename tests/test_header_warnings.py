"""Issue 24, items 4 and 5: a NIfTI without orientation (sform_code = qform_code = 0) and one with a sheared
affine are segmented as the official tool does, with one warning each that says what was assumed
(common.imaging.header_checks): returned by load_scan, recorded in 06's result JSON and printed once.

Every input is made here, in tmp_path, from the real CT example_ct_sm (RAS, 3 mm).
"""
from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.script_loader import load_script

from common.imaging.header_checks import SHEAR_TOL_DEG, largest_shear_deg
from common.imaging.validation import load_scan
from common.records.results import read_result


def _source(example_ct_sm: Path) -> nib.Nifti1Image:
    return nib.load(str(example_ct_sm))


def _no_orientation(src: nib.Nifti1Image, target: Path) -> Path:
    """The scan with its sform and qform codes set to 0 (as some converters and hand-written files have)."""
    hdr = src.header.copy()
    hdr["sform_code"] = 0
    hdr["qform_code"] = 0
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), None, hdr), target)
    return target


def _sheared(src: nib.Nifti1Image, target: Path, degrees: float, keep_pixdim: bool = False) -> Path:
    """The scan with its z axis tilted by ``degrees`` towards x (a gantry tilt written into the sform).

    ``keep_pixdim``: the header keeps 3 mm voxel sizes (the slice distance) while the affine's z column is longer,
    as some converters write a tilted series; otherwise nibabel writes the column lengths into pixdim."""
    affine = np.array(src.affine, dtype=np.float64)
    affine[0, 2] = affine[2, 2] * math.tan(math.radians(degrees))
    data = np.asanyarray(src.dataobj)
    if keep_pixdim:
        hdr = src.header.copy()
        hdr.set_sform(affine, code=1)
        hdr["qform_code"] = 0
        hdr.set_zooms(src.header.get_zooms()[:3])
        nib.save(nib.Nifti1Image(data, None, hdr), target)
    else:
        nib.save(nib.Nifti1Image(data, affine, src.header), target)
    return target


def test_no_orientation_is_one_warning_naming_the_assumed_axes(example_ct_sm, tmp_path):
    src = _source(example_ct_sm)
    path = _no_orientation(src, tmp_path / "no_orientation.nii.gz")
    raw = nib.load(str(path))
    assert raw.header["sform_code"] == 0 and raw.header["qform_code"] == 0
    assumed = "".join(nib.orientations.aff2axcodes(raw.header.get_base_affine()))
    assert assumed == "LAS"  # nibabel's fallback: x negated, whereas the scan itself is RAS
    assert "".join(nib.aff2axcodes(src.affine)) == "RAS"
    vol, warnings = load_scan(path)
    assert "".join(nib.aff2axcodes(vol.affine)) == assumed  # what is segmented on
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert w.startswith(str(path)) and "orientation unknown" in w and "sform_code and qform_code are 0" in w
    assert f"axes {assumed}" in w and "left and right" in w and "\n" not in w
    # the file as it was: no such warning
    assert load_scan(example_ct_sm)[1] == []


def test_nifti2_without_orientation_is_warned_too(example_ct_sm, tmp_path):
    src = _source(example_ct_sm)
    hdr = nib.Nifti2Header()
    hdr.set_data_shape(src.shape)
    hdr.set_data_dtype(src.get_data_dtype())
    hdr.set_zooms(src.header.get_zooms()[:3])
    nib.save(nib.Nifti2Image(np.asanyarray(src.dataobj), None, hdr), tmp_path / "n2.nii")
    warnings = load_scan(tmp_path / "n2.nii")[1]
    assert [w for w in warnings if "orientation unknown" in w and "axes LAS" in w], warnings


def test_sheared_affine_is_one_warning_with_its_angle(example_ct_sm, tmp_path):
    src = _source(example_ct_sm)
    path = _sheared(src, tmp_path / "sheared.nii.gz", 5.0)
    affine = nib.load(str(path)).affine
    dev, pair, angle = largest_shear_deg(affine)
    assert dev == pytest.approx(5.0, abs=1e-3) and pair == "x/z" and angle == pytest.approx(85.0, abs=1e-3)
    vol, warnings = load_scan(path)
    assert np.allclose(vol.affine, affine)  # accepted as it is (the official tool segments it)
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert w.startswith(str(path)) and "sheared affine" in w and "85.00 degrees" in w and "5.00 degrees" in w
    assert "official TotalSegmentator" in w and "voxel grid" in w and "\n" not in w


def test_sheared_affine_with_the_slice_distance_in_pixdim_is_still_one_warning(example_ct_sm, tmp_path):
    """check_spacing's "header voxel size differs from the affine's" line is folded into the shear warning."""
    src = _source(example_ct_sm)
    path = _sheared(src, tmp_path / "tilted.nii.gz", 10.0, keep_pixdim=True)
    img = nib.load(str(path))
    norms = np.linalg.norm(img.affine[:3, :3], axis=0)
    assert np.allclose(img.header.get_zooms()[:3], 3.0) and norms[2] > 3.04  # header and affine disagree
    warnings = load_scan(path)[1]
    assert len(warnings) == 1, warnings
    assert "sheared affine" in warnings[0] and "not the header's (3, 3, 3) mm" in warnings[0]


def test_float_rounding_of_the_axes_is_no_shear(example_ct_sm, tmp_path):
    src = _source(example_ct_sm)
    tiny = 1e-4  # degrees: what a float32 sform of an oblique scan carries
    assert tiny < SHEAR_TOL_DEG
    path = _sheared(src, tmp_path / "rounding.nii.gz", tiny)
    assert largest_shear_deg(nib.load(str(path)).affine)[0] > 0  # the axes really are off by a hair
    assert load_scan(path)[1] == []
    # an oblique (rotated, not sheared) scan is no shear either
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    rot = np.eye(4)
    rot[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), rot @ src.affine, src.header), tmp_path / "oblique.nii.gz")
    assert load_scan(tmp_path / "oblique.nii.gz")[1] == []


def test_06_records_and_prints_each_warning_once(example_ct_sm, tmp_path, in_tiny_home, capsys):
    """One small 06 run (small-tile stand-in) on a folder holding both files: each scan is segmented, its
    warning is in the result JSON's `warnings` of that scan, and printed exactly once."""
    from common.inference.run_config import RunConfig, save_config

    src = _source(example_ct_sm).slicer[30:90, 25:80, :]
    scans = tmp_path / "scans"
    scans.mkdir()
    files = {"no_orientation": _no_orientation(src, scans / "no_orientation.nii.gz"),
             "sheared": _sheared(src, scans / "sheared.nii.gz", 5.0)}
    config = save_config(RunConfig.fastest_exact(), tmp_path / "config.json")
    result = tmp_path / "06.json"
    s06 = load_script("06_inferenceAndPassport.py")
    code = s06.main(["--input", str(scans), "--out", str(tmp_path / "m06"), "--result", str(result),
                     "--config", str(config), "--weights", "standin", "--no-passport"])
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert code == 0, printed[-3000:]
    by_id = {s["scan_id"]: s for s in read_result(result)["scans"]}
    assert set(by_id) == set(files)
    expected = {"no_orientation": "orientation unknown", "sheared": "sheared affine"}
    for scan_id, needle in expected.items():
        rec = by_id[scan_id]
        assert rec["status"] == "ok", rec.get("error")
        assert len(rec["warnings"]) == 1 and needle in rec["warnings"][0], rec["warnings"]
        assert printed.count(rec["warnings"][0]) == 1, printed[-3000:]
        assert printed.count(needle) == 1, printed[-3000:]
        # the mask is on the input's own voxel grid, with its affine (as the official tool writes it)
        mask, scan = nib.load(rec["mask"]), nib.load(str(files[scan_id]))
        assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
