"""DICOM input as users have it (common.imaging.dicom through common.imaging.validation.load_scan): series found by content
(extension-less files, .dcm, zips with or without a sub-folder), the CT series chosen in a folder of several,
the official tool's dicom2nifti grid reproduced exactly, and broken series refused in one line.

Every series is written at test time from a crop of example_ct_sm (40 x 40 x 12 voxels of 3 mm), in LPS
orientation as scanners write it, stored as uint16 with RescaleIntercept -1024 (so the loader must apply the
rescale to get HU); variants are made by editing the files with pydicom.
"""
from __future__ import annotations

import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers.dicom_files import copy_series, extensionless, write_dicom_series, write_series, zip_folder

import common.imaging.dicom_zip
from common.core.errors import InputError
from common.imaging.discovery import discover
from common.imaging.validation import load_scan

N_SLICES = 12
STEP_MM = 3.0


@pytest.fixture(scope="module")
def crop(example_ct_sm) -> nib.Nifti1Image:
    """The NIfTI route: an int16 HU crop (x, y, z), RAS as the file."""
    ct = nib.load(example_ct_sm)
    sub = ct.slicer[40:80, 30:70, 0:N_SLICES]
    return nib.Nifti1Image(np.asanyarray(sub.dataobj), sub.affine)


@pytest.fixture(scope="module")
def series(crop, tmp_path_factory) -> Path:
    """The reference series folder (slice_000.dcm ...), never modified by tests (copy it first)."""
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    write_series(crop, folder, SeriesDescription="abdomen 3mm")
    return folder


@pytest.fixture(scope="module")
def official(series, tmp_path_factory) -> nib.Nifti1Image:
    """What the official tool segments for this series: dicom2nifti's own conversion, as dicom_io.dcm_to_nifti."""
    import dicom2nifti

    out = tmp_path_factory.mktemp("official") / "converted_dcm.nii.gz"
    dicom2nifti.dicom_series_to_nifti(str(series), str(out), reorient_nifti=True)
    return nib.load(out)


@pytest.fixture
def scratch(monkeypatch, tmp_path) -> Path:
    """Temporary files of the loader go here, so that a test can check that none is left behind."""
    tmp = tmp_path / "scratch"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _assert_same_ct(vol, crop: nib.Nifti1Image, official: nib.Nifti1Image) -> None:
    """The official dicom2nifti grid (shape, affine, array as stored) and, reoriented, the NIfTI route's HU."""
    img = vol.image
    assert img.shape == official.shape
    assert np.allclose(img.affine, official.affine, atol=1e-6, rtol=0)
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(official.dataobj))
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    for code in ("qform_code", "sform_code"):
        assert img.header[code] == official.header[code]
    ours, ref = nib.as_closest_canonical(img), nib.as_closest_canonical(crop)
    assert np.allclose(ours.affine, ref.affine, atol=1e-3)
    assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(ref.dataobj))  # HU, rescale applied


def _assert_one_line(exc: pytest.ExceptionInfo, where: Path, *phrases: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{where}: "), msg
    assert all(p in msg for p in phrases), msg
    return msg


# ---- series as users have them ------------------------------------------------------------------------------

LAYOUTS = {
    "dcm_files": lambda series, tmp: copy_series(series, tmp / "ct"),
    "extensionless_files": extensionless,
    "zip": lambda series, tmp: zip_folder(series, tmp / "ct.zip"),
    "zip_with_subfolder": lambda series, tmp: zip_folder(extensionless(series, tmp), tmp / "export.zip", "DICOM/S0001/"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_series_loads_on_the_official_grid_with_the_niftis_hu(layout, series, crop, official, tmp_path, scratch):
    path = LAYOUTS[layout](series, tmp_path)
    vol, warnings = load_scan(path)
    assert warnings == []
    assert vol.path == path
    _assert_same_ct(vol, crop, official)
    assert list(scratch.iterdir()) == []  # the zip's extraction and the conversion's folders are gone


def test_a_series_written_in_another_orientation_still_matches_dicom2nifti(crop, tmp_path):
    """Slices whose rows and columns run the other way (RAS, ImageOrientationPatient -1,0,0,0,-1,0), stored
    int16 without rescale, file names in reverse slice order: still dicom2nifti's grid and the NIfTI's HU."""
    import dicom2nifti

    folder = tmp_path / "ras"
    write_dicom_series(crop, folder)
    for i, f in enumerate(sorted(folder.iterdir())):
        f.rename(folder / f"{(N_SLICES - i) * 7:04d}")  # file names in reverse order of the slices
    official_out = tmp_path / "converted.nii.gz"
    dicom2nifti.dicom_series_to_nifti(str(folder), str(official_out), reorient_nifti=True)
    vol, _ = load_scan(folder)
    _assert_same_ct(vol, crop, nib.load(official_out))


@pytest.mark.parametrize("other", ["scout", "mr"])
def test_a_folder_with_two_series_takes_the_ct_and_names_the_other(other, series, crop, official, tmp_path):
    folder = copy_series(series, tmp_path / "study")
    if other == "scout":  # a 3-slice CT localizer
        write_series(crop.slicer[:, :, 4:7], tmp_path / other, ".7", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                     SeriesDescription="topogram")
        expected = ["localizer", "topogram", "(3 files)"]
    else:  # an MR series with MORE slices than the CT: the modality decides, not the size
        longer = nib.Nifti1Image(np.concatenate([np.asanyarray(crop.dataobj)] * 2, axis=2), crop.affine)
        write_series(longer, tmp_path / other, ".8", Modality="MR", SeriesDescription="t1 vibe")
        expected = ["MR series", "t1 vibe", f"({2 * N_SLICES} files)"]
    for f in (tmp_path / other).iterdir():
        f.rename(folder / f"{other}_{f.name}")
    vol, warnings = load_scan(folder)
    _assert_same_ct(vol, crop, official)
    (w,) = [w for w in warnings if "DICOM series" in w]
    assert w.startswith(f"{folder} holds 2 DICOM series: segmented CT series") and "abdomen 3mm" in w, w
    assert all(p in w.split(", not ")[1] for p in expected), w
    assert "\n" not in w


def test_a_folder_without_ct_segments_the_largest_image_series_with_a_warning(series, crop, tmp_path):
    folder = tmp_path / "mr_only"
    write_series(crop, folder, ".9", Modality="MR", SeriesDescription="t2")
    write_series(crop.slicer[:, :, 4:7], tmp_path / "loc", ".10", Modality="MR", SeriesDescription="loc")
    for f in (tmp_path / "loc").iterdir():
        f.rename(folder / f"loc_{f.name}")
    vol, warnings = load_scan(folder, modality="MR")
    assert vol.shape == (40, 40, N_SLICES)
    assert any("no CT series" in w and "MR series" in w and "'t2'" in w for w in warnings), warnings


# ---- broken series: one line each ------------------------------------------------------------------------------

def _edit(folder: Path, fn) -> None:
    for i, f in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(f)
        fn(i, ds)
        ds.save_as(f)


def _shift_z(i, ds):  # slices 6.. 3 mm further apart: spacing 3 mm, then 6 mm
    if i >= 6:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + STEP_MM * (i - 5)]


def _tilt(i, ds):  # 15° gantry tilt: each slice moves sideways (y) by step * tan(15°)
    pos = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [pos[0], pos[1] + i * STEP_MM * np.tan(np.radians(15)), pos[2]]


def _truncate(folder: Path) -> None:
    f = sorted(folder.iterdir())[5]
    f.write_bytes(f.read_bytes()[:-700])


def _corrupt(folder: Path) -> None:
    f = sorted(folder.iterdir())[5]
    data = bytearray(f.read_bytes())
    data[400:900] = np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()  # header garbled
    f.write_bytes(bytes(data))


def _rtstruct_only(folder: Path) -> None:
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    for f in folder.iterdir():
        f.unlink()
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID += ".99"
    del ds.PixelData
    ds.save_as(folder / "RS.dcm")


BROKEN_FOLDERS = {
    "missing slice": (lambda d: sorted(d.iterdir())[5].unlink(),
                      ["slice spacing varies from 3 to 6 mm", "a missing slice between z="]),
    "duplicated slice": (lambda d: shutil.copy(sorted(d.iterdir())[5], d / "slice_005_copy.dcm"),
                         ["duplicated slice", "slice_005.dcm", "slice_005_copy.dcm"]),
    "uneven spacing": (lambda d: _edit(d, _shift_z), ["slice spacing varies from 3 to 6 mm", "it changes"]),
    "truncated slice": (_truncate, ["slice_005.dcm", "truncated"]),
    "corrupt slice": (_corrupt, ["slice_005.dcm", "not a readable DICOM image"]),
    "gantry tilt": (lambda d: _edit(d, _tilt), ["gantry tilt of 15.0°"]),
    "no image series": (_rtstruct_only, ["no DICOM image series", "RTSTRUCT"]),
}


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_a_broken_series_is_one_line_naming_the_folder_and_the_problem(case, series, tmp_path, scratch):
    break_it, phrases = BROKEN_FOLDERS[case]
    folder = copy_series(series, tmp_path / "broken")
    break_it(folder)
    with pytest.raises(InputError) as exc:
        load_scan(folder)
    print(_assert_one_line(exc, folder, *phrases))
    assert list(scratch.iterdir()) == []


def test_a_broken_series_in_a_zip_names_the_zip(series, tmp_path, scratch):
    folder = copy_series(series, tmp_path / "broken")
    sorted(folder.iterdir())[5].unlink()
    target = zip_folder(folder, tmp_path / "broken.zip", "sub/")
    with pytest.raises(InputError) as exc:
        load_scan(target)
    _assert_one_line(exc, target, "a missing slice")
    assert list(scratch.iterdir()) == []


def _traversal(z: zipfile.ZipFile, series: Path) -> None:
    z.write(sorted(series.iterdir())[0], "../escaped.dcm")


def _symlink(z: zipfile.ZipFile, series: Path) -> None:
    info = zipfile.ZipInfo("link.dcm")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    z.writestr(info, "/etc/passwd")


BROKEN_ZIPS = {
    "no DICOM": (lambda z, s: z.writestr("notes/readme.txt", "no scan here"), ["zip archive holds no DICOM files"]),
    "path traversal": (_traversal, ["'../escaped.dcm'", "path traversal"]),
    "symbolic link": (_symlink, ["'link.dcm'", "symbolic link"]),
}


@pytest.mark.parametrize("case", BROKEN_ZIPS)
def test_a_bad_zip_is_one_line_and_nothing_is_written_outside(case, series, tmp_path, scratch):
    add, phrases = BROKEN_ZIPS[case]
    target = tmp_path / "in" / "upload.zip"
    target.parent.mkdir()
    with zipfile.ZipFile(target, "w") as z:
        add(z, series)
    with pytest.raises(InputError) as exc:
        load_scan(target)
    _assert_one_line(exc, target, *phrases)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["upload.zip"]  # nothing extracted


def test_a_zip_larger_than_free_memory_is_refused_before_extraction(series, tmp_path, scratch, monkeypatch):
    target = zip_folder(series, tmp_path / "ct.zip")
    monkeypatch.setattr(common.imaging.dicom_zip, "available_memory_bytes", lambda: 10_000)
    with pytest.raises(InputError) as exc:
        load_scan(target)
    _assert_one_line(exc, target, "uncompressed", "of memory available")
    assert list(scratch.iterdir()) == []


# ---- discovery ---------------------------------------------------------------------------------------------------

def test_discovery_finds_a_zipped_series_and_a_dicom_subfolder_as_scans(series, tmp_path):
    root = tmp_path / "inbox"
    extensionless(series, root, "p1")
    zip_folder(series, root / "p2.zip", "DICOM/")
    zip_folder(series, root / "p1.zip")  # same stem as the folder p1/: ids made unique by kind
    batch = discover(root)
    assert batch.refused == [] and batch.ignored == []
    assert set(batch.scans) == {root / "p1", root / "p2.zip", root / "p1.zip"}
    assert batch.ids == {root / "p1": "p1_dicom", root / "p1.zip": "p1_zip", root / "p2.zip": "p2"}
    assert discover(root / "p2.zip").ids == {root / "p2.zip": "p2"}
