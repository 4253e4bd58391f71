"""01_download_data.py --from: equal file or folder names in different folders never collide, remaining scan-id
collisions are refused in one line each, nothing written earlier is overwritten, and exit codes say so.

Inputs are crops of the real example CT (NIfTI, and DICOM series written with SimpleITK), made at test time.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.dicom_files import write_dicom_series
from helpers.script_loader import load_script

from common.core.atomic import leftover_temp_files

cli = load_script("01_download_data.py")


@pytest.fixture(scope="module")
def crops(example_ct_sm) -> list[nib.Nifti1Image]:
    """Six distinct 24 x 24 x 10 int16 crops (x, y, z) of the real CT, each with its own affine (RAS mm)."""
    src = nib.load(str(example_ct_sm))
    data = np.asanyarray(src.dataobj)
    out = []
    for i in range(6):
        corner = np.array([30 + 6 * i, 30 + 3 * i, 4 + i])
        crop = np.ascontiguousarray(data[corner[0]:corner[0] + 24, corner[1]:corner[1] + 24,
                                         corner[2]:corner[2] + 10]).astype(np.int16)
        affine = np.array(src.affine, dtype=np.float64)
        affine[:3, 3] = affine[:3, :3] @ corner + affine[:3, 3]
        out.append(nib.Nifti1Image(crop, affine))
    assert len({c.get_fdata().tobytes() for c in out}) == len(out)  # every source is told apart by its voxels
    return out


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _errors(capsys) -> list[str]:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert all(line.startswith(("error: ", "warning: ")) and "Traceback" not in line for line in err), err
    return [line for line in err if line.startswith("error: ")]


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def test_patient_series_layout_gets_one_output_per_source(tmp_path, crops, capsys):
    src = tmp_path / "scans"
    n1 = _save(crops[0], src / "p1" / "scan.nii.gz")
    n2 = _save(crops[1], src / "p2" / "scan.nii.gz")
    labels = (_voxels(n1) > 0).astype(np.uint8)
    seg = _save(nib.Nifti1Image(labels, crops[0].affine), src / "p1" / "scan_seg.nii.gz")
    flat = _save(crops[2], src / "flat.nii.gz")
    write_dicom_series(crops[3], src / "p1" / "CT")
    write_dicom_series(crops[4], src / "p2" / "CT")
    (src / "p2" / "notes.txt").write_text("not a scan", encoding="utf-8")
    _save(crops[5], src / ".cache" / "old.nii.gz")  # hidden: left out
    out = tmp_path / "ct_data"

    assert cli.main(["--from", str(src), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    assert f"skipped {src / 'p2' / 'notes.txt'}: not a NIfTI file" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [
        "flat.nii.gz", "p1__CT.nii.gz", "p1__scan.nii.gz", "p1__scan_seg.nii.gz", "p2__CT.nii.gz", "p2__scan.nii.gz"]
    for source, name in [(n1, "p1__scan.nii.gz"), (n2, "p2__scan.nii.gz"), (seg, "p1__scan_seg.nii.gz"),
                         (flat, "flat.nii.gz")]:
        assert (out / name).read_bytes() == source.read_bytes(), name  # copied as is, flat names unchanged
    for crop, name in [(crops[3], "p1__CT.nii.gz"), (crops[4], "p2__CT.nii.gz")]:
        got = nib.load(str(out / name))
        assert nib.aff2axcodes(got.affine) == ("L", "A", "S"), name  # dicom2nifti's grid, as the official tool's
        got, crop = nib.as_closest_canonical(got), nib.as_closest_canonical(crop)
        assert np.array_equal(np.asanyarray(got.dataobj), np.asanyarray(crop.dataobj)), name
        assert np.allclose(got.affine, crop.affine, atol=1e-3), name
    assert leftover_temp_files(out) == []


def test_same_scan_id_is_refused_in_one_line_naming_both(tmp_path, crops, capsys):
    src = tmp_path / "scans"
    a_nii = _save(crops[0], src / "a.nii")
    a_gz = _save(crops[1], src / "a.nii.gz")
    b_gz = _save(crops[2], src / "b.nii.gz")
    write_dicom_series(crops[3], src / "b")
    upper = _save(crops[4], src / "A_seg.nii.gz")
    lower = _save(crops[5], src / "a_SEG.nii.gz")
    clash = _save(crops[5], src / "p1__ct.nii.gz")  # what p1/ct.nii.gz is named in OUT
    nested = _save(crops[4], src / "p1" / "ct.nii.gz")
    out = tmp_path / "ct_data"

    assert cli.main(["--from", str(src), "--out", str(out)]) == 1
    errors = _errors(capsys)
    assert len(errors) == 4, errors
    for later, first in [(a_gz, a_nii), (src / "b", b_gz), (lower, upper), (clash, nested)]:
        line = next(e for e in errors if e.startswith(f"error: {later}: not imported"))
        assert str(first) in line and "same scan id" in line
    # the first of each pair is imported, as itself; nothing was written twice
    assert sorted(p.name for p in out.iterdir()) == ["A_seg.nii.gz", "a.nii", "b.nii.gz", "p1__ct.nii.gz"]
    for source, name in [(a_nii, "a.nii"), (b_gz, "b.nii.gz"), (upper, "A_seg.nii.gz"), (nested, "p1__ct.nii.gz")]:
        assert (out / name).read_bytes() == source.read_bytes(), name


def test_reimport_keeps_same_content_and_refuses_other_content_without_force(tmp_path, crops, capsys):
    src = tmp_path / "scans"
    scan = _save(crops[0], src / "p1" / "scan.nii.gz")
    write_dicom_series(crops[1], src / "p1" / "CT")
    out = tmp_path / "ct_data"
    assert cli.main(["--from", str(src), "--out", str(out)]) == 0
    before = _snapshot(out)

    assert cli.main(["--from", str(src), "--out", str(out)]) == 0  # same content: kept, no error
    assert _errors(capsys) == []
    assert _snapshot(out) == before

    # the sources change (another patient under the same path): refused without --force, outputs untouched
    _save(crops[2], scan)
    shutil.rmtree(src / "p1" / "CT")
    write_dicom_series(crops[3], src / "p1" / "CT")
    assert cli.main(["--from", str(src), "--out", str(out)]) == 1
    errors = _errors(capsys)
    assert len(errors) == 2, errors
    for name, source in [("p1__scan.nii.gz", scan), ("p1__CT.nii.gz", src / "p1" / "CT")]:
        line = next(e for e in errors if e.startswith(f"error: {out / name}:"))
        assert "different scan" in line and str(source) in line and "--force" in line
    assert _snapshot(out) == before

    assert cli.main(["--from", str(src), "--out", str(out), "--force"]) == 0
    assert (out / "p1__scan.nii.gz").read_bytes() == scan.read_bytes()
    assert np.array_equal(np.asanyarray(nib.as_closest_canonical(nib.load(out / "p1__CT.nii.gz")).dataobj),
                          np.asanyarray(nib.as_closest_canonical(crops[3]).dataobj))  # on the dicom2nifti grid


def test_extra_dicom_series_and_output_inside_source_are_reported(tmp_path, crops, capsys):
    import SimpleITK as sitk

    src = tmp_path / "scans"
    write_dicom_series(crops[0], src / "p1" / "CT")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for f in sorted((src / "p1" / "CT").glob("*.dcm")):  # a second series (other UID) in the same folder
        sl = sitk.ReadImage(str(f))
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.4243")
        sl.SetMetaData("0008|0018", sl.GetMetaData("0008|0018") + "9")
        writer.SetFileName(str(f.with_name("second_" + f.name)))
        writer.Execute(sl)
    out = src / "ct_data"
    assert cli.main(["--from", str(src), "--out", str(out)]) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "DICOM series" in errors[0] and "not imported" in errors[0]
    assert [p.name for p in out.iterdir()] == ["p1__CT.nii.gz"]

    # the output folder inside --from is not searched: our own outputs never become inputs
    shutil.rmtree(src / "p1")
    _save(crops[1], src / "b.nii.gz")
    assert cli.main(["--from", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["b.nii.gz", "p1__CT.nii.gz"]
    assert "not searching the output folder" in capsys.readouterr().out

    assert cli.main(["--from", str(out), "--out", str(out)]) == 1
    assert _errors(capsys) == [f"error: {out}: --from and --out are the same folder; import into another folder"]
