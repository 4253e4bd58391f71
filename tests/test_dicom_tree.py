"""Issue 24 (DICOM): a CD/PACS export (DICOMDIR + patient/study/series tree holding a CT series, an SR and an
RTSTRUCT) is one scan, the rest listed as ignored with their reason, in discovery, 06, totalseg-fast and 01 --from;
and one slice whose RescaleIntercept disagrees with its neighbours' (stored values continuous, HU not) is named in
one warning, recorded in 06's results and printed once.

Every input is written at test time from a crop of the shared real CT (example_ct_sm); 06 and totalseg-fast run
on the small-tile stand-in (32^3 tiles, conftest).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers.dicom_files import BASIC_TEXT_SR, RT_STRUCTURE_SET, write_cd_export, write_series
from helpers.script_loader import load_script

from common.core.errors import InputError
from common.imaging.dicom_series import non_image_kind
from common.imaging.validation import load_scan
from common.inference.run_config import RunConfig, save_config
from common.records.results import read_result
from common.sources.inputs import resolve_inputs

N_SLICES = 12
ODD_SLICE = 5  # slice_005.dcm, InstanceNumber 6


@pytest.fixture(scope="module")
def crop(example_ct_sm) -> nib.Nifti1Image:
    """An int16 HU crop (40 x 40 x 12 voxels of 3 mm, x, y, z) of the real CT."""
    sub = nib.load(example_ct_sm).slicer[40:80, 30:70, 0:N_SLICES]
    return nib.Nifti1Image(np.asanyarray(sub.dataobj), sub.affine)


@pytest.fixture(scope="module")
def cd_master(crop, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("cd") / "CD"
    return root, write_cd_export(crop, root)


@pytest.fixture
def cd(cd_master, tmp_path) -> tuple[Path, dict[str, Path]]:
    """A fresh copy of the CD export: (its root, {"DICOMDIR": file, "CT"|"SR"|"RTSTRUCT": series folder})."""
    root, where = cd_master
    copy = shutil.copytree(root, tmp_path / "CD")
    return copy, {k: copy / v.relative_to(root) for k, v in where.items()}


@pytest.fixture
def args06(tmp_path, tiny_onnx_model, in_tiny_home):
    cfg = save_config(RunConfig.fastest_exact(), tmp_path / "config.json")
    return ["--onnx", str(tiny_onnx_model), "--weights", "standin", "--config", str(cfg), "--max-points", "50"]


def _expected_ignored(where: dict[str, Path]) -> dict[str, str]:
    return {str(where["DICOMDIR"]): "DICOMDIR (a CD's index file)",
            str(where["SR"]): "SR series (no image data): not a scan",
            str(where["RTSTRUCT"]): "RTSTRUCT series (no image data): not a scan"}


def _run06(argv: list[str], capsys) -> tuple[int, str]:
    code = load_script("06_inferenceAndPassport.py").main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ---- the CD tree: discovery ---------------------------------------------------------------------------------------

def test_the_tree_of_a_cd_export_is_one_scan_and_its_other_objects_are_ignored(cd):
    root, where = cd
    assert sorted(p.name for p in root.iterdir()) == ["DICOMDIR", "PT000000"]
    batch = resolve_inputs(str(root), log=lambda _: None)
    assert batch.scans == [where["CT"]] and batch.refused == []
    assert {i["file"]: i["reason"] for i in batch.ignored} == _expected_ignored(where)


def test_a_tree_with_two_image_series_is_still_two_scans(cd):
    root, where = cd
    second = where["CT"].parent / "SE000009"
    shutil.copytree(where["CT"], second)
    for f in second.iterdir():
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID += ".9"
        ds.SOPInstanceUID += ".9"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f)
    batch = resolve_inputs(str(root), log=lambda _: None)
    assert batch.scans == [where["CT"], second] and batch.refused == []
    assert len(set(batch.ids.values())) == 2
    assert {i["file"]: i["reason"] for i in batch.ignored} == _expected_ignored(where)


def _flat_copy(where: dict, flat: Path) -> Path:
    """The CD's CT, SR and RTSTRUCT files in one flat folder (no DICOMDIR)."""
    flat.mkdir()
    for key in ("CT", "SR", "RTSTRUCT"):
        for f in where[key].iterdir():
            shutil.copy(f, flat / f.name)
    return flat


def test_an_input_holding_only_an_rtstruct_is_nothing_to_do(cd):
    _, where = cd
    with pytest.raises(InputError) as exc:
        resolve_inputs(str(where["RTSTRUCT"]), log=lambda _: None)
    assert "nothing to do" in str(exc.value) and "RTSTRUCT series (no image data)" in str(exc.value)


def test_the_same_files_in_one_flat_folder_are_one_scan_with_one_warning(cd, tmp_path):
    _, where = cd
    flat = _flat_copy(where, tmp_path / "flat")
    shutil.copy(where["DICOMDIR"], flat / "DICOMDIR")
    batch = resolve_inputs(str(flat), log=lambda _: None)
    assert batch.scans == [flat] and batch.ignored == [] and batch.refused == []
    _, warnings = load_scan(flat)
    (w,) = warnings
    assert w.startswith(f"{flat} holds 3 DICOM series: segmented CT series") and "\n" not in w, w
    assert "not image series, ignored: " in w and "RTSTRUCT series" in w and "SR series" in w, w
    assert "put each series in its own folder" not in w  # there is no other image series to segment


def _dataset(sop: str, modality: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.Modality, ds.SeriesInstanceUID = sop, modality, "1.2.3"
    return ds


@pytest.mark.parametrize("sop, modality, pixels, kind", [
    ("1.2.840.10008.1.3.10", "", False, "DICOMDIR"),
    (RT_STRUCTURE_SET, "RTSTRUCT", False, "RTSTRUCT"),
    (BASIC_TEXT_SR, "SR", False, "SR"),
    ("1.2.840.10008.5.1.4.1.1.88.59", "KO", False, "KO"),
    ("1.2.840.10008.5.1.4.1.1.11.1", "PR", False, "PR"),
    ("1.2.840.10008.5.1.4.1.1.66.1", "REG", False, "REG"),
    ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN", False, "RTPLAN"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "RTDOSE", False, "RTDOSE"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "RTDOSE", True, "RTDOSE"),  # a dose grid has pixels, and is no scan
    ("1.2.840.10008.5.1.4.1.1.66.4", "SEG", True, "SEG"),  # by its SOP class, whatever its pixel data
    ("1.2.840.10008.5.1.4.1.1.66.4", "CT", True, "SEG"),  # ... and whatever its Modality says
    ("1.2.840.10008.5.1.4.1.1.104.1", "OT", False, "DOC"),  # an encapsulated PDF, named by its SOP class
    ("1.2.3.4.5.6", "OT", False, "OT"),  # a private object without pixel data
    ("1.2.840.10008.5.1.4.1.1.2", "CT", True, None),  # a CT slice
    ("1.2.840.10008.5.1.4.1.1.2", "CT", False, None),  # a CT slice without pixel data: the loader says "truncated"
    ("1.2.840.10008.5.1.4.1.1.7", "OT", True, None),  # a secondary capture is an image
])
def test_non_image_objects_are_told_by_sop_class_modality_and_pixel_data(sop, modality, pixels, kind):
    assert non_image_kind(_dataset(sop, modality), pixels) == kind


# ---- the CD tree: 06, totalseg-fast, 01 --from --------------------------------------------------------------------

@pytest.mark.slow  # the stand-in network
def test_06_segments_the_ct_of_a_cd_export_and_lists_the_rest_as_ignored(cd, tmp_path, args06, capsys):
    root, where = cd
    result = tmp_path / "r.json"
    code, printed = _run06(["--input", str(root), "--out", str(tmp_path / "out"), "--result", str(result),
                            *args06], capsys)
    assert code == 0, printed
    res = read_result(result)
    assert res["complete"] is True
    (scan,) = res["scans"]
    assert scan["status"] == "ok" and scan["file"] == str(where["CT"]) and scan["warnings"] == []
    assert Path(scan["mask"]).exists()
    assert {i["file"]: i["reason"] for i in res["ignored"]} == _expected_ignored(where)
    assert "FAILED" not in printed and "Traceback" not in printed
    assert f"ignored {where['RTSTRUCT']}: RTSTRUCT series (no image data): not a scan" in printed


@pytest.mark.slow  # the stand-in network
def test_totalseg_fast_segments_the_ct_of_a_cd_export(cd, tmp_path, tiny_onnx_model, in_tiny_home, capsys):
    from common.cli.console import main

    root, where = cd
    out = tmp_path / "segs"
    code = main(["-i", str(root), "-o", str(out), "--ml", "--weights", "standin", "--onnx", str(tiny_onnx_model)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "FAILED" not in captured.err + captured.out and "Traceback" not in captured.err
    assert "1 scan(s) segmented, 0 failed" in captured.out
    assert f"ignored {where['SR']}: SR series (no image data): not a scan" in captured.out
    (seg,) = out.rglob("segmentations.nii.gz")
    assert seg.parent.name == "PT000000__ST000000__SE000000"


def test_01_from_a_cd_export_says_what_it_ignores_and_imports(cd, tmp_path, capsys):
    root, where = cd
    out = tmp_path / "ct_data"
    code = load_script("01_download_data.py").main(["--from", str(root), "--out", str(out)])
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert code == 0, printed
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["PT000000__ST000000__SE000000.nii.gz"]
    lines = printed.splitlines()
    for key, reason in (("DICOMDIR", "DICOMDIR (a CD's index file)"), ("SR", "SR (no image data)"),
                        ("RTSTRUCT", "RTSTRUCT (no image data)")):
        (line,) = [x for x in lines if str(where[key]) in x]
        assert line.strip().startswith("ignored ") and line.endswith(reason), line
    assert "not part of a DICOM series" not in printed and "segment" not in printed, printed


def test_01_from_a_flat_folder_of_several_series_says_imported_not_segmented(cd, tmp_path, capsys):
    _, where = cd
    flat = _flat_copy(where, tmp_path / "flat")
    code = load_script("01_download_data.py").main(["--from", str(flat), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    (w,) = [x for x in err.splitlines() if x.startswith("warning: ")]
    assert "holds 3 DICOM series: imported CT series" in w and "segment" not in w, w


# ---- one slice's rescale against its neighbours' -----------------------------------------------------------------

@pytest.fixture
def odd_series(crop, tmp_path) -> Path:
    """The crop as a series whose slice ODD_SLICE has RescaleIntercept 0 instead of -1024, its stored values
    unchanged (continuous with the neighbours'): its HU are 1024 too high."""
    folder = tmp_path / "odd"
    files = write_series(crop, folder, SeriesDescription="abdomen 3mm")
    ds = pydicom.dcmread(files[ODD_SLICE])
    assert int(ds.InstanceNumber) == ODD_SLICE + 1 and float(ds.RescaleIntercept) == -1024
    ds.RescaleIntercept = "0"
    ds.save_as(files[ODD_SLICE])
    return folder


def _rescale_warnings(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "Rescale" in w]


def test_a_slice_whose_intercept_disagrees_with_its_neighbours_is_named_in_one_warning(odd_series, crop):
    vol, warnings = load_scan(odd_series)
    (w,) = _rescale_warnings(warnings)
    assert w.startswith(f"{odd_series}: slice slice_{ODD_SLICE:03d}.dcm (instance {ODD_SLICE + 1};"), w
    assert "RescaleIntercept 0 where its neighbours have -1024" in w and "jump by +1024" in w and "\n" not in w, w
    # the HU are left as dicom2nifti gives them (the slice's own rescale), as the official tool reads them
    ours, ref = np.asanyarray(nib.as_closest_canonical(vol.image).dataobj), np.asanyarray(crop.dataobj)
    assert np.array_equal(ours[:, :, ODD_SLICE], ref[:, :, ODD_SLICE] + 1024)
    assert np.array_equal(np.delete(ours, ODD_SLICE, axis=2), np.delete(ref, ODD_SLICE, axis=2))


def test_a_clean_series_and_one_with_a_consistent_rescale_change_give_no_warning(crop, tmp_path):
    clean = tmp_path / "clean"
    files = write_series(crop, clean)
    assert _rescale_warnings(load_scan(clean)[1]) == []
    ds = pydicom.dcmread(files[ODD_SLICE])  # another intercept, stored values shifted to match: same HU
    ds.PixelData = (ds.pixel_array.astype(np.int32) - 24).astype(np.uint16).tobytes()
    ds.RescaleIntercept = "-1000"
    ds.save_as(files[ODD_SLICE])
    vol, warnings = load_scan(clean)
    assert _rescale_warnings(warnings) == []
    assert np.array_equal(np.asanyarray(nib.as_closest_canonical(vol.image).dataobj), np.asanyarray(crop.dataobj))


@pytest.mark.slow  # the stand-in network
def test_06_records_the_rescale_warning_of_the_scan_and_prints_it_once(odd_series, tmp_path, args06, capsys):
    result = tmp_path / "r.json"
    code, printed = _run06(["--input", str(odd_series), "--out", str(tmp_path / "out"), "--result", str(result),
                            *args06], capsys)
    assert code == 0, printed
    (scan,) = read_result(result)["scans"]
    (w,) = _rescale_warnings(scan["warnings"])
    assert f"slice slice_{ODD_SLICE:03d}.dcm (instance {ODD_SLICE + 1};" in w, w
    assert printed.count("RescaleIntercept 0 where its neighbours have -1024") == 1, printed
    assert f"warning: odd: {w}" in printed


@pytest.mark.slow  # the stand-in network
def test_totalseg_fast_prints_the_rescale_warning_once(odd_series, tmp_path, tiny_onnx_model, in_tiny_home, capsys):
    from common.cli.console import main

    code = main(["-i", str(odd_series), "-o", str(tmp_path / "segs"), "--weights", "standin", "--onnx",
                 str(tiny_onnx_model)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = captured.out + captured.err
    lines = [x for x in printed.splitlines() if "RescaleIntercept 0 where its neighbours have -1024" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: "), printed
