"""totalseg-fast against the official TotalSegmentator --fast (python API, offline, same stand-in weights) on a
crop of the shared real CT: the same file names, masks, headers, label-map extension and statistics.

Both run on the small-tile stand-in (32^3 tiles; conftest.tiny_standin_home) to keep the suite's time flat.
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.inference.run_config import RunConfig, save_config
from common.inference.weights import standin_folder
from common.runs.official import OfficialRunner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory, example_ct_sm, tiny_standin_home, tiny_onnx_model, project_home):
    d = tmp_path_factory.mktemp("console")
    scan = d / "ct.nii.gz"
    nib.save(nib.load(example_ct_sm).slicer[30:100, 25:85, 0:30], scan)
    official = d / "official"
    official.mkdir()  # the official tool creates the masks folder without parents
    with OfficialRunner(standin_folder(tiny_standin_home), project_home=tiny_standin_home) as runner:
        runner.segment(scan, official / "masks", ml=False, statistics=True, timeout_s=600)
        runner.segment(scan, official / "ml.nii.gz", ml=True, timeout_s=600)
    with project_home(tiny_standin_home):
        yield {"dir": d, "scan": scan, "official": official, "onnx": tiny_onnx_model}


def _ours(work, *argv: str) -> int:
    from common.cli.console import main

    return main(["-i", str(work["scan"]), "--weights", "standin", "--onnx", str(work["onnx"]), "-q", *argv])


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _same_header(ours: nib.Nifti1Image, theirs: nib.Nifti1Image) -> None:
    assert ours.shape == theirs.shape
    assert np.allclose(ours.affine, theirs.affine, atol=1e-5)
    assert ours.get_data_dtype() == theirs.get_data_dtype() == np.uint8
    for key in ("qform_code", "sform_code", "xyzt_units", "descrip", "pixdim"):
        assert np.array_equal(ours.header[key], theirs.header[key]), key


def test_default_output_is_one_official_mask_per_class(work):
    out = work["dir"] / "ours_masks"
    assert _ours(work, "-o", str(out)) == 0
    theirs = work["official"] / "masks"
    names = sorted(p.name for p in theirs.glob("*.nii.gz"))
    assert len(names) == 117 and sorted(p.name for p in out.glob("*.nii.gz")) == names
    total_diff = total = 0
    worst = 1.0
    for name in names:
        a, b = nib.load(out / name), nib.load(theirs / name)
        _same_header(a, b)
        da, db = _data(out / name), _data(theirs / name)
        worst = min(worst, float(np.mean(da == db)))
        total_diff += int(np.sum(da != db))
        total = da.size
    print(f"per-class masks: worst agreement {worst:.6f}; label map agreement {1 - total_diff / 2 / total:.6f}")
    assert worst >= 0.999
    assert 1 - total_diff / 2 / total >= 0.9999  # each differing voxel shows in two class masks


def test_ml_file_has_the_official_label_map(work):
    from totalsegmentator.nifti_ext_header import load_multilabel_nifti

    ours_path = work["dir"] / "ours_ml.nii.gz"
    assert _ours(work, "-o", str(ours_path), "--ml") == 0
    theirs_path = work["official"] / "ml.nii.gz"
    _same_header(nib.load(ours_path), nib.load(theirs_path))
    assert np.mean(_data(ours_path) == _data(theirs_path)) >= 0.9999
    _, our_map = load_multilabel_nifti(ours_path)
    _, their_map = load_multilabel_nifti(theirs_path)
    assert our_map == their_map and len(our_map) == 117 and our_map[5] == "liver"


def test_statistics_match_the_official_on_identical_masks(work, tmp_path):
    """With the PyTorch backend our labels equal the official ones voxel for voxel (tests/test_parity.py), so
    the statistics must agree to rounding."""
    cfg = save_config(RunConfig(backend="pytorch", name="exact torch"), tmp_path / "torch.json")
    out = work["dir"] / "ours_stats"
    assert _ours(work, "-o", str(out), "--statistics", "--config", str(cfg)) == 0
    ours = json.loads((out / "statistics.json").read_text(encoding="utf-8"))
    theirs = json.loads((work["official"] / "masks" / "statistics.json").read_text(encoding="utf-8"))
    assert list(ours) == list(theirs) and len(ours) == 117
    nonzero = 0
    for name, vals in theirs.items():
        assert set(ours[name]) == set(vals)
        for key, v in vals.items():
            assert ours[name][key] == pytest.approx(v, rel=1e-6, abs=1e-9), (name, key)
            nonzero += v != 0
    assert nonzero >= 2  # at least one structure lies inside the crop (random weights scatter most to the border)


def test_roi_subset_writes_exactly_those_masks_and_the_preview_shows_labels(work):
    out = work["dir"] / "ours_subset"
    assert _ours(work, "-o", str(out), "--roi_subset", "liver,spleen", "--preview", "--statistics") == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["liver.nii.gz", "spleen.nii.gz"]
    assert sorted(json.loads((out / "statistics.json").read_text(encoding="utf-8"))) == ["liver", "spleen"]
    import matplotlib.image as mpimg

    png = mpimg.imread(out / "preview_total.png")[..., :3]
    coloured = np.abs(png[..., 0] - png[..., 1]) + np.abs(png[..., 1] - png[..., 2]) > 0.15  # not grey
    assert coloured.sum() > 0


def test_unknown_roi_and_missing_gpu_are_one_line_exit_2(work, capsys):
    assert _ours(work, "-o", str(work["dir"] / "x"), "--roi_subset", "livr") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "livr" in err[0]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the no-GPU refusal cannot be shown here")
    assert _ours(work, "-o", str(work["dir"] / "x"), "--device", "gpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0]
    assert not list((work["dir"] / "x").glob("*.nii.gz"))  # nothing segmented


def test_the_installed_command_runs_a_folder_of_scans(work, tmp_path, example_ct_sm):
    """The console script declared in pyproject.toml (on the venv's PATH after the README's set-up): a folder
    with two scans and a bad file; each scan into <o>/<scan id>/, the bad one named, exit 1."""
    exe = Path(sys.executable).parent / "totalseg-fast"
    assert exe.exists(), "run the README's set-up (pip install -e .) to install totalseg-fast"
    src = tmp_path / "in"
    (src / "p1").mkdir(parents=True)
    nib.save(nib.load(work["scan"]), src / "p1" / "ct.nii.gz")
    nib.save(nib.load(example_ct_sm).slicer[40:80, 30:70, 5:25], src / "b.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"not a scan")
    proc = subprocess.run([str(exe), "-i", str(src), "-o", str(tmp_path / "out"), "--weights", "standin", "--onnx",
                           str(work["onnx"]), "-q", "--ml"], capture_output=True, timeout=600,  # env: the tiny home
                          encoding="utf-8", errors="replace")
    assert proc.returncode == 1, proc.stderr
    assert (tmp_path / "out" / "p1__ct" / "segmentations.nii.gz").exists()
    assert (tmp_path / "out" / "b" / "segmentations.nii.gz").exists()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "broken.nii.gz" in lines[0] and "Traceback" not in proc.stderr
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert importlib.metadata.version("TotalSegmentator") in version.stdout


def test_dicom_as_users_have_it_gives_the_masks_of_the_nifti_route(work, tmp_path, example_ct_sm, capsys):
    """One folder run (one model session): a series of .dcm files, the same series extension-less, zipped (in a
    sub-folder of the zip), beside a 3-slice scout series, and broken (a missing slice); plus the NIfTI the
    official tool's dicom2nifti conversion makes of it (the NIfTI route). Every DICOM form gives that NIfTI's
    masks voxel for voxel on its grid; the two-series folder says which series it took; the broken one is one
    line naming its folder, and the batch goes on (exit 1)."""
    import shutil

    import dicom2nifti
    from helpers.dicom_files import extensionless, write_series, zip_folder

    from common.cli.console import main

    crop = nib.load(example_ct_sm).slicer[40:80, 30:70, 0:16]
    crop = nib.Nifti1Image(np.asanyarray(crop.dataobj), crop.affine)
    series = tmp_path / "series"
    write_series(crop, series, SeriesDescription="abdomen 3mm")
    src = tmp_path / "in"
    src.mkdir()
    dicom2nifti.dicom_series_to_nifti(str(series), str(src / "nifti_route.nii.gz"), reorient_nifti=True)
    shutil.copytree(series, src / "dcm")
    extensionless(series, src, "pacs")
    zip_folder(extensionless(series, tmp_path, "zipped"), src / "export.zip", "DICOM/S0001/")
    shutil.copytree(series, src / "study")
    write_series(crop.slicer[:, :, 4:7], tmp_path / "scout", ".7", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                 SeriesDescription="topogram")
    for f in (tmp_path / "scout").iterdir():
        f.rename(src / "study" / f"scout_{f.name}")
    shutil.copytree(series, src / "broken")
    sorted((src / "broken").iterdir())[5].unlink()
    out = tmp_path / "out"
    code = main(["-i", str(src), "-o", str(out), "--weights", "standin", "--onnx", str(work["onnx"]), "--ml"])
    err = capsys.readouterr().err
    assert code == 1, err
    print(err)
    broken = [line for line in err.splitlines() if str(src / "broken") in line]
    assert len(broken) == 1 and "slice spacing varies" in broken[0], err
    assert any(line.startswith("warning: ") and "holds 2 DICOM series: segmented CT series" in line
               and "abdomen 3mm" in line and "topogram" in line for line in err.splitlines()), err
    assert "Traceback" not in err
    ref = nib.load(out / "nifti_route" / "segmentations.nii.gz")
    assert nib.aff2axcodes(ref.affine) == ("L", "A", "S") and np.any(_data(out / "nifti_route" /
                                                                         "segmentations.nii.gz"))
    for scan_id in ("dcm", "pacs", "export", "study"):
        got = nib.load(out / scan_id / "segmentations.nii.gz")
        assert got.shape == ref.shape and np.allclose(got.affine, ref.affine, atol=1e-5), scan_id
        assert np.array_equal(_data(out / scan_id / "segmentations.nii.gz"), np.asanyarray(ref.dataobj)), scan_id
    assert not (out / "broken").exists() or not list((out / "broken").iterdir())
