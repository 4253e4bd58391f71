"""A run killed midway (SIGKILL or SIGTERM) leaves no partial mask or passport, and a valid result JSON
marked incomplete (written after every scan)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest

from common.core.atomic import leftover_temp_files
from common.inference.weights import PROJECT_HOME_ENV
from common.records.passport import load_passport
from common.records.results import read_result

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scan_folder(tmp_path_factory, example_ct):
    d = tmp_path_factory.mktemp("kill_scans")
    img = nib.load(example_ct)
    for i in range(3):
        nib.save(img.slicer[30 + i:80, 30:75, 40:70], d / f"scan_{i}.nii.gz")
    return d


def _start_06(scan_folder: Path, out: Path, onnx: Path, home: Path) -> subprocess.Popen:
    from common.inference.run_config import RunConfig, save_config

    cfg = save_config(RunConfig(), out.parent / "config.json")  # independent of any local 05 result
    # the test session's (temporary) user home; the small-tile stand-in (32^3 tiles) in its own project home
    env = {**os.environ, PROJECT_HOME_ENV: str(home)}
    cmd = [sys.executable, str(ROOT / "06_inferenceAndPassport.py"), "--input", str(scan_folder), "--out",
           str(out), "--result", str(out / "06.json"), "--onnx", str(onnx), "--max-points", "20000", "--config", str(cfg),
           "--weights", "standin"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_first_output(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not list(out.glob("*_seg.nii.gz")) and not list(out.glob(".tmp-*")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def _assert_outputs_complete(out: Path) -> int:
    """Every output under its final name is whole: masks load, passports validate, the JSON validates."""
    masks = sorted(out.glob("*_seg.nii.gz"))
    for m in masks:
        assert nib.load(m).get_fdata().shape == nib.load(m).shape
    for p in sorted(out.glob("*_passport.json")):
        load_passport(p)
    if (out / "06.json").exists():
        read_result(out / "06.json")
    return len(masks)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_no_partial_output(sig, scan_folder, tmp_path, tiny_onnx_model, tiny_standin_home):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start_06(scan_folder, out, tiny_onnx_model, tiny_standin_home)
    _wait_for_first_output(out, proc)
    time.sleep(0.3)  # somewhere inside the first scan's writes or the second scan
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    if (out / "06.json").exists():  # written after every scan (absent if killed in the first scan's writes)
        assert read_result(out / "06.json")["complete"] is False  # complete only at the end
    _assert_outputs_complete(out)
    if sig == signal.SIGTERM:
        assert leftover_temp_files(out) == []  # a caught signal cleans its temporary files
    # a resumed run completes the batch and skips what was complete
    proc = _start_06(scan_folder, out, tiny_onnx_model, tiny_standin_home)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    assert _assert_outputs_complete(out) == 3
