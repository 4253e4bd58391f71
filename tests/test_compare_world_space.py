"""07 compares masks in world space: masks whose grids differ only in axis order and direction (the official tool
stores a DICOM scan's mask LAS, ours is LPS) get agreement and Dice; a real grid mismatch is explained in one line.

Label maps are made at test time from a crop of the real example CT (HU bands as labels).
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.compare_cases import STANDIN, load_07

from common.imaging.mask_io import save_labels
from common.records.results import add_repeat, finalize_scan, new_result, new_scan_record, summarize, write_result
from common.sources.variants import reorient

HU_BANDS = (-500, -100, 100, 300)  # air, fat, soft tissue, contrast, bone -> labels 0..4


@pytest.fixture(scope="module")
def labels_lps(example_ct_sm) -> nib.Nifti1Image:
    """A 40 x 36 x 30 uint8 label map (x, y, z; labels 0-4) of a real CT crop, stored LPS."""
    ct = nib.load(str(example_ct_sm)).slicer[40:80, 30:66, 0:30]
    labels = np.digitize(np.asanyarray(ct.dataobj), HU_BANDS).astype(np.uint8)
    img = reorient(nib.Nifti1Image(labels, ct.affine), "LPS")
    assert len(np.unique(np.asanyarray(img.dataobj))) == 5
    return img


def _save(img: nib.Nifti1Image, path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> str:
    data = np.asanyarray(img.dataobj) if data is None else data
    return str(save_labels(data, img.affine if affine is None else affine, path))


def _result(tmp_path: Path, name: str, method: str, masks: dict[str, str], seconds: float) -> Path:
    """A result file with one ok scan per entry of ``masks`` (scan id -> mask file)."""
    res = new_result(f"{name}.py", method=method, settings={}, model=STANDIN)
    for scan, mask in masks.items():
        shape = nib.load(mask).shape
        rec = new_scan_record(f"ct_data/{scan}", shape=shape, spacing_mm=(3, 3, 3), orientation="LPS")
        add_repeat(rec, seconds, {"inference": seconds / 2})
        finalize_scan(rec)
        rec["mask"] = mask
        res["scans"].append(rec)
    summarize(res)
    return write_result(res, tmp_path / f"{name}.json")


def test_masks_stored_in_other_axis_orders_are_compared_in_world_space(tmp_path, labels_lps, capsys):
    ours, official = tmp_path / "06", tmp_path / "03"
    data, aff = np.asanyarray(labels_lps.dataobj), labels_lps.affine
    ref = {  # the official tool's masks: LAS (dicom2nifti), and one in a permuted axis order
        "las": _save(reorient(labels_lps, "LAS"), official / "las.nii.gz"),
        "psl": _save(reorient(labels_lps, "PSL"), official / "psl.nii.gz"),
        "same": _save(labels_lps, official / "same.nii.gz"),
    }
    ours_masks = {sid: _save(labels_lps, ours / f"{sid}.nii.gz") for sid in ref}
    # truly different grids: origin shifted by one voxel; other spacing; one slice fewer
    shifted = aff.copy()
    shifted[:3, 3] += aff[:3, 1]
    zoomed = aff @ np.diag([1.0, 1.0, 2.5 / 3.0, 1.0])
    for sid, mdata, maff in [("shifted", data, shifted), ("spacing", data, zoomed), ("shape", data[:, :, :-1], aff)]:
        ref[sid] = _save(reorient(labels_lps, "LAS"), official / f"{sid}.nii.gz")
        ours_masks[sid] = _save(labels_lps, ours / f"{sid}.nii.gz", mdata, maff)
    r03 = _result(tmp_path, "03_vanilla", "official_pytorch", ref, 10.0)
    r06 = _result(tmp_path, "06_inference", "inference_passport", ours_masks, 2.0)

    out = tmp_path / "report"
    assert load_07().main(["--results", str(r03), str(r06), "--out-dir", str(out)]) == 0, capsys.readouterr().err
    doc = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    rows = {r["scan_id"]: r for r in doc["rows"] if not r["is_reference"]}
    for sid, reoriented in [("las", "LPS -> LAS"), ("psl", "LPS -> PSL"), ("same", None)]:
        r = rows[sid]
        assert r["pair_error"] is None and r["reoriented"] == reoriented, (sid, r["pair_error"])
        assert r["voxel_agreement"] == 1.0, sid
        assert r["dice"] == {str(k): 1.0 for k in range(1, 5)}, sid
    assert any("las / inference_passport" in n and "world space" in n for n in doc["notes"])

    expected = {
        "shifted": "origin 3 mm apart",
        "spacing": "spacing 3x3x2.5 vs 3x3x3 mm",
        "shape": "shape 40x36x29 vs 40x36x30",
    }
    for sid, what in expected.items():
        r = rows[sid]
        assert r["voxel_agreement"] is None and r["dice"] is None, sid
        err = r["pair_error"]
        assert "\n" not in err and "mask grid differs from the reference's" in err and what in err, err
        assert "affine" not in err, err
        others = [w for s, w in expected.items() if s != sid]
        assert not any(w.split()[0] in err for w in others), err  # names only what differs
        assert any(n.endswith(err) for n in doc["notes"])
    md = (out / "comparison.md").read_text(encoding="utf-8")
    assert "origin 3 mm apart" in md


def test_ground_truth_in_another_axis_order_gets_dice(tmp_path, labels_lps):
    from common.imaging.mask_io import align_to_grid

    gt = reorient(labels_lps, "LAS")
    data = np.asanyarray(labels_lps.dataobj)
    aligned, problem, reoriented = align_to_grid(gt.shape, gt.affine, data, labels_lps.affine, "ground truth")
    assert problem is None and reoriented == "LPS -> LAS"
    assert aligned.dtype == np.uint8 and aligned.flags.c_contiguous
    assert np.array_equal(aligned, np.asanyarray(gt.dataobj))
    rotated = labels_lps.affine.copy()
    rotated[:3, :3] = rotated[:3, :3] @ np.array([[np.cos(0.1), -np.sin(0.1), 0], [np.sin(0.1), np.cos(0.1), 0],
                                                   [0, 0, 1]])
    aligned, problem, _ = align_to_grid(gt.shape, gt.affine, data, rotated, "ground truth")
    assert aligned is None and "direction 5.73° apart" in problem and "shape" not in problem, problem


@pytest.mark.slow
def test_07_on_a_dicom_scan_processed_by_03_and_06(tmp_path, example_ct_sm, tiny_onnx_model, in_tiny_home, capsys):
    """A DICOM series (axial, LPS as scanners write it) through the official tool (03: dicom2nifti, mask LAS) and
    ours (06: common.imaging.dicom runs the same conversion, mask LAS too); 07 compares them on one grid, no
    reorientation needed, and reports agreement and Dice."""
    import importlib

    from helpers.dicom_files import write_dicom_series

    from common.inference.run_config import RunConfig, save_config

    crop = nib.load(str(example_ct_sm)).slicer[45:85, 35:75, 0:30]  # 40 x 40 x 30 voxels of 3 mm
    scan = tmp_path / "dicom" / "patient_ct"
    write_dicom_series(reorient(nib.Nifti1Image(np.asanyarray(crop.dataobj), crop.affine), "LPS"), scan)
    common = ["--input", str(scan), "--weights", "standin"]
    s03 = importlib.import_module("03_vanilla_benchmark")
    assert s03.main([*common, "--out", str(tmp_path / "m03"), "--result", str(tmp_path / "03.json"),
                     "--repeats", "1", "--warmup", "0"]) == 0, capsys.readouterr().err
    cfg = save_config(RunConfig(), tmp_path / "config.json")
    s06 = importlib.import_module("06_inferenceAndPassport")
    assert s06.main([*common, "--out", str(tmp_path / "m06"), "--result", str(tmp_path / "06.json"),
                     "--onnx", str(tiny_onnx_model), "--config", str(cfg), "--no-passport"]) == 0, \
        capsys.readouterr().err

    out = tmp_path / "report"
    assert load_07().main(["--results", str(tmp_path / "03.json"), str(tmp_path / "06.json"),
                               "--out-dir", str(out)]) == 0, capsys.readouterr().err
    doc = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    row = next(r for r in doc["rows"] if not r["is_reference"])
    print(f"03 vs 06 on DICOM: reoriented {row['reoriented']}, agreement {row['voxel_agreement']}, "
          f"mean Dice {row['mean_dice']}")
    assert row["pair_error"] is None and row["reoriented"] is None, (row["pair_error"], row["reoriented"])
    m03, m06 = (nib.load(next((tmp_path / d).glob("*.nii.gz"))) for d in ("m03", "m06"))
    assert m03.shape == m06.shape and np.allclose(m03.affine, m06.affine, atol=1e-4)  # the official grid
    assert row["voxel_agreement"] is not None and row["voxel_agreement"] > 0.99
    assert row["dice"] and row["mean_dice"] is not None
