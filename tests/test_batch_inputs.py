"""Issue 14 on 06's batches: every input found is segmented with its own outputs or named with a one-line
reason; "nothing to do" is an error; an interrupted batch leaves a valid incomplete record; unwritable outputs
are refused before any work; two runs on one output folder share the work.

Inputs are made here from the shared real CT; 06 runs on the small-tile stand-in (32^3 tiles, conftest).
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.dicom_files import write_dicom_series
from helpers.processes import default_sigint

from common.core.atomic import leftover_temp_files
from common.inference.run_config import RunConfig, save_config
from common.inference.weights import PROJECT_HOME_ENV
from common.records.results import read_result

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _crop(img: nib.Nifti1Image, i: int) -> nib.Nifti1Image:
    """A distinct small crop (about 30 x 30 x 20 voxels) of the real CT for each ``i``."""
    return img.slicer[40 + 3 * i:70 + 3 * i, 35:65 + i, 5:25]


def _run06(argv: list[str], capsys) -> tuple[int, str]:
    code = importlib.import_module("06_inferenceAndPassport").main(argv)
    return code, capsys.readouterr().err


@pytest.fixture
def args06(tmp_path, tiny_onnx_model, in_tiny_home):
    cfg = save_config(RunConfig.fastest_exact(), tmp_path / "config.json")
    return ["--onnx", str(tiny_onnx_model), "--weights", "standin", "--config", str(cfg), "--max-points", "50"]


def test_every_input_found_is_segmented_or_reported(tmp_path, example_ct_sm, args06, capsys):
    ct = nib.load(example_ct_sm)
    src = tmp_path / "in"
    (src / "p1").mkdir(parents=True)
    (src / "p2").mkdir()
    expect_ok = {}  # input path -> its image (to check that its own mask has its grid)
    for i, rel in enumerate(["p1/ct.nii.gz", "p2/ct.nii.gz", "a.nii.gz", "a.nii", "series/extra.nii.gz"]):
        img = _crop(ct, i)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, src / rel)
        expect_ok[src / rel] = img
    # DICOM folders: "a/" beside a.nii.gz (extension-less files, as PACS exports), and "series/" holding a NIfTI
    write_dicom_series(_crop(ct, 6), src / "a")
    for f in (src / "a").iterdir():
        f.rename(f.with_suffix(""))
    write_dicom_series(_crop(ct, 7), src / "series_tmp")
    for f in (src / "series_tmp").iterdir():
        f.rename(src / "series" / f.name)
    (src / "series_tmp").rmdir()
    expect_ok[src / "a"] = _crop(ct, 6)
    expect_ok[src / "series"] = _crop(ct, 7)
    for name in ("x_seg.nii.gz", "x_labels.nii.gz", "y_mask.nii.gz", "z_gt.nii.gz"):  # label-map names
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), src / name)
    (src / "loop.nii.gz").symlink_to(src / "loop.nii.gz")  # a symlink loop
    (src / "p1" / "up").symlink_to(src)  # a folder loop
    (src / "zipped").mkdir()
    with zipfile.ZipFile(src / "zipped" / "series.zip", "w") as z:
        z.writestr("slice.dcm", b"x")
    out = tmp_path / "out"
    code, err = _run06(["--input", str(src), "--out", str(out), "--result", str(tmp_path / "r.json"), *args06], capsys)
    res = read_result(tmp_path / "r.json")
    assert res["complete"] is True
    assert code == 1  # the loops and the zip (one broken slice) fail
    by_file = {s["file"]: s for s in res["scans"]}
    ignored = {i["file"]: i["reason"] for i in res["ignored"]}
    masks = set()
    for path, img in expect_ok.items():
        rec = by_file[str(path)]
        assert rec["status"] == "ok", rec["error"]
        mask = nib.as_closest_canonical(nib.load(rec["mask"]))  # DICOM masks are on dicom2nifti's LAS grid
        img = nib.as_closest_canonical(img)
        assert mask.shape == img.shape and np.allclose(mask.affine, img.affine, atol=1e-3), path
        masks.add(rec["mask"])
    assert len(masks) == len(expect_ok)  # no two inputs share an output: nothing overwritten
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == sorted(Path(m).name for m in masks)
    ids = [s["scan_id"] for s in res["scans"]]
    assert len(set(ids)) == len(ids) and {"p1__ct", "p2__ct"} <= set(ids)
    assert any("a.nii.gz" in n and "a_niigz" in n for n in res["notes"])  # the renaming is said, in one line
    for name in ("x_seg.nii.gz", "x_labels.nii.gz", "y_mask.nii.gz", "z_gt.nii.gz"):
        assert "label map" in ignored[str(src / name)]
    failed = {Path(s["file"]).name: s["error"] for s in res["scans"] if s["status"] == "failed"}
    assert set(failed) == {"loop.nii.gz", "up", "series.zip"}, failed
    assert "symbolic link" in failed["loop.nii.gz"] and "symbolic link" in failed["up"]
    assert all("\n" not in e and f in e for f, e in failed.items())
    assert "zip archive" in failed["series.zip"] and "DICOM" in failed["series.zip"], failed["series.zip"]
    assert "Traceback" not in err
    assert not leftover_temp_files(out)


def test_outputs_written_into_the_input_folder_are_not_taken_as_inputs(tmp_path, example_ct_sm, args06, capsys):
    src = tmp_path / "in"
    src.mkdir()
    nib.save(_crop(nib.load(example_ct_sm), 0), src / "ct.nii.gz")
    argv = ["--input", str(src), "--out", str(src), "--result", str(src / "r.json"), *args06]
    assert _run06(argv, capsys)[0] == 0
    code, err = _run06(argv, capsys)
    res = read_result(src / "r.json")
    assert code == 0 and res["scans"] == [] and not res["ignored"]  # no mask, passport or record became an input
    assert [s["file"] for s in res["skipped"]] == [str(src / "ct.nii.gz")]


@pytest.mark.parametrize("content", ["empty", "only label maps"])
def test_nothing_to_do_is_an_error(tmp_path, content, args06, capsys):
    src = tmp_path / "in"
    src.mkdir()
    if content == "only label maps":
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), src / "case_seg.nii.gz")
    code, err = _run06(["--input", str(src), "--out", str(tmp_path / "out"), "--result", str(tmp_path / "r.json"),
                        *args06], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "nothing to do" in lines[-1] and str(src) in lines[-1]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("target", ["result", "out"])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, example_ct_sm, args06, capsys, target):
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    out, result = tmp_path / "out", tmp_path / "r.json"
    if target == "result":
        result = blocker / "r.json"
    else:
        out = blocker
    t0 = time.perf_counter()
    code, err = _run06(["--input", str(example_ct_sm), "--out", str(out), "--result", str(result), *args06], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and str(blocker) in lines[0] and "not a folder" in lines[0]
    assert not list(tmp_path.rglob("*_seg.nii.gz")) and time.perf_counter() - t0 < 30


def _start_06(scans: Path, out: Path, result: Path, onnx: Path, home: Path, cfg: Path) -> subprocess.Popen:
    env = {**os.environ, PROJECT_HOME_ENV: str(home)}
    cmd = [sys.executable, str(ROOT / "06_inferenceAndPassport.py"), "--input", str(scans), "--out", str(out),
           "--result", str(result), "--onnx", str(onnx), "--weights", "standin", "--config", str(cfg)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)


def _small_scans(d: Path, example_ct_sm: Path, n: int, step: int) -> Path:
    """n small crops of the shared CT, shifted by `step` voxels along x, as scan_0 … scan_{n-1}."""
    d.mkdir()
    ct = nib.load(example_ct_sm)
    for i in range(n):
        nib.save(ct.slicer[30 + step * i:90 + step * i, 30:90, 2:28], d / f"scan_{i}.nii.gz")
    return d


@pytest.fixture
def four_scans(tmp_path, example_ct_sm) -> Path:
    return _small_scans(tmp_path / "scans", example_ct_sm, 4, 5)


@pytest.fixture
def ten_scans(tmp_path, example_ct_sm) -> Path:
    """A batch long enough that a signal sent after the first scan lands before the last, even on a loaded
    machine."""
    return _small_scans(tmp_path / "scans10", example_ct_sm, 10, 3)


def _finished(result: Path) -> int:
    try:
        return sum(s["status"] == "ok" for s in json.loads(result.read_text(encoding="utf-8"))["scans"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_batch_leaves_a_valid_incomplete_record(sig, ten_scans, tmp_path, tiny_onnx_model,
                                                               tiny_standin_home):
    out = tmp_path / "out"
    cfg = save_config(RunConfig.fastest_exact(), tmp_path / "config.json")
    proc = _start_06(ten_scans, out, out / "06.json", tiny_onnx_model, tiny_standin_home, cfg)
    t0 = time.time()
    while not _finished(out / "06.json"):  # the first scan is finished and recorded
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = err.decode("utf-8", errors="replace")
    assert proc.returncode == 128 + sig
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and signal.Signals(sig).name in said[0]
    res = read_result(out / "06.json")
    assert res["complete"] is False and res["interrupted"] == signal.Signals(sig).name
    done = [s for s in res["scans"] if s["status"] == "ok"]
    assert done and done[0]["scan_id"] == "scan_0" and len(done) < 10
    for s in done:
        assert Path(s["mask"]).exists()
    assert leftover_temp_files(out) == []


def test_two_runs_on_one_output_folder_share_the_work(four_scans, tmp_path, tiny_onnx_model, tiny_standin_home):
    out = tmp_path / "out"
    cfg = save_config(RunConfig.fastest_exact(), tmp_path / "config.json")
    procs = [_start_06(four_scans, out, tmp_path / f"r{i}.json", tiny_onnx_model, tiny_standin_home, cfg)
             for i in range(2)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    results = [read_result(tmp_path / f"r{i}.json") for i in range(2)]
    segmented = [s["scan_id"] for r in results for s in r["scans"] if s["status"] == "ok"]
    assert sorted(segmented) == [f"scan_{i}" for i in range(4)]  # each scan segmented exactly once
    skipped = [s for r in results for s in r["skipped"]]
    assert len(skipped) == 4 and all("another run" in s["reason"] or "up to date" in s["reason"] for s in skipped)
    assert len(list(out.glob("*_seg.nii.gz"))) == 4
    assert json.loads((out / "scan_0_run.json").read_text(encoding="utf-8"))


def test_a_folder_with_two_dicom_series_names_the_one_not_segmented(tmp_path, example_ct_sm):
    import pydicom

    from common.imaging.validation import load_scan

    ct = nib.load(example_ct_sm)
    write_dicom_series(_crop(ct, 0), tmp_path / "ct")
    write_dicom_series(ct.slicer[40:60, 40:60, 5:9], tmp_path / "scout")  # a 4-slice "scout"
    for f in (tmp_path / "scout").iterdir():  # another series UID, moved beside the CT
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".2"
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".2"
        ds.save_as(tmp_path / "ct" / f"scout_{f.name}")
    vol, warnings = load_scan(tmp_path / "ct")
    assert vol.shape == _crop(ct, 0).shape  # the CT (most files), not the scout
    (w,) = [w for w in warnings if "DICOM series" in w]
    assert "2 DICOM series" in w and "(4 files)" in w and "\n" not in w


def test_a_result_write_that_fails_midway_is_said_and_the_batch_goes_on(four_scans, tmp_path, args06, capsys,
                                                                       monkeypatch):
    """A full disk while the result JSON is rewritten after a scan (simulated: ENOSPC from the writer for two
    writes): one warning line each, the batch goes on, and the final write records everything, complete."""
    import errno

    import common.records.results as results

    real, calls = results.atomic_write_json, []

    def flaky(path, obj):
        calls.append(path)
        if len(calls) in (2, 3):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(results, "atomic_write_json", flaky)
    code, err = _run06(["--input", str(four_scans), "--out", str(tmp_path / "out"), "--result",
                        str(tmp_path / "r.json"), *args06], capsys)
    warned = [line for line in err.splitlines() if "could not be written" in line]
    assert code == 0 and len(warned) == 2 and "No space left" in warned[0] and "Traceback" not in err
    res = read_result(tmp_path / "r.json")
    assert res["complete"] is True and [s["status"] for s in res["scans"]] == ["ok"] * 4
