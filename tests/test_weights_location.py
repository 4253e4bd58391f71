"""Where the weights live: the stand-in only in the project's own home, the user's TotalSegmentator home
never written (issue: never touch the user's official install), official weights preferred when installed.

The test session runs with HOME and TOTALSEG_HOME_DIR pointed at empty temporary folders (conftest.py);
tests here use further temporary user homes of their own.
"""
from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import pytest

from common.inference.model import STANDIN_MARKER, load_model_spec
from common.inference.weights import DATASET_NAME, ensure_task297, probe_download, project_totalseg_home, standin_folder
from common.records.results import read_result

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_scan(tmp_path_factory, example_ct_sm) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    nib.save(nib.load(example_ct_sm).slicer[30:90, 25:80, :], d / "tiny_ct.nii.gz")
    return d / "tiny_ct.nii.gz"


def _ours_in(home: Path) -> list[Path]:
    """What the suite must never leave in a user's TotalSegmentator home."""
    if not home.exists():
        return []
    return list(home.rglob(f"{DATASET_NAME}*")) + ([home / "config.json"] if (home / "config.json").exists() else [])


def test_standin_lives_in_the_project_home(standin_home, model_spec):
    assert model_spec.folder == standin_folder()
    assert str(model_spec.folder).startswith(str(project_totalseg_home()))
    assert not str(model_spec.folder).startswith(os.environ["TOTALSEG_HOME_DIR"])
    assert model_spec.provenance()["weights"] == "standin"


def test_offline_auto_falls_back_in_one_line_and_writes_nothing_to_the_user(user_home, standin_home):
    lines: list[str] = []
    t0 = time.perf_counter()
    folder = ensure_task297("auto", log=lines.append)
    assert time.perf_counter() - t0 < 15
    assert folder == standin_folder()
    assert len(lines) == 1 and "stand-in" in lines[0] and "Task 297" in lines[0], lines
    assert not _ours_in(user_home)
    with pytest.raises(RuntimeError, match="official Task 297 weights unavailable"):
        ensure_task297("official", log=lines.append)
    assert not _ours_in(user_home)


def test_download_probe_goes_through_the_https_proxy(monkeypatch):
    """Hospitals reach GitHub through a proxy: the probe must ask the proxy (here a local one that refuses)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    seen: list[bytes] = []

    def serve():
        conn, _ = server.accept()
        with conn:
            seen.append(conn.recv(4096))
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    reason = probe_download(timeout=10)
    t.join(10)
    server.close()
    assert reason is not None and "github.com" in reason
    assert seen and seen[0].startswith(b"CONNECT github.com:443")


def _install_fake_official(user_home: Path) -> Path:
    """A copy of the stand-in placed where TotalSegmentator keeps official weights, without the marker."""
    dst = user_home / "nnunet" / "results" / standin_folder().relative_to(standin_folder().parents[1])
    shutil.copytree(standin_folder(), dst)
    (dst / STANDIN_MARKER).unlink()
    return dst


def test_official_weights_in_the_user_home_are_used_once_installed(user_home, standin_home, onnx_model,
                                                                   tiny_scan, tmp_path):
    # offline first: the project's stand-in
    assert ensure_task297("auto", log=lambda _: None) == standin_folder()
    # later the official weights are installed (as TotalSegmentator's downloader does): they win from then on
    official = _install_fake_official(user_home)
    assert ensure_task297("auto") == official
    assert load_model_spec(official).provenance()["weights"] == "official"
    s06 = importlib.import_module("06_inferenceAndPassport")
    code = s06.main(["--input", str(tiny_scan), "--out", str(tmp_path / "m06"), "--result", str(tmp_path / "06.json"),
                     "--onnx", str(onnx_model), "--no-passport"])
    assert code == 0
    assert read_result(tmp_path / "06.json")["model"]["weights"] == "official"
    s03 = importlib.import_module("03_vanilla_benchmark")
    code = s03.main(["--input", str(tiny_scan), "--out", str(tmp_path / "m03"), "--result", str(tmp_path / "03.json"),
                     "--repeats", "1", "--warmup", "0"])
    res = read_result(tmp_path / "03.json")
    assert code == 0 and res["scans"][0]["status"] == "ok", res["scans"][0].get("error")
    assert res["model"]["weights"] == "official"
    # the official tool ran on the user's weights, but its config writes went to the project's home
    assert not (user_home / "config.json").exists()
    assert sorted(p.name for p in user_home.iterdir()) == ["nnunet"]


def test_standin_left_in_the_user_home_by_an_older_version_is_named_not_used(user_home, standin_home):
    legacy = user_home / "nnunet" / "results" / standin_folder().relative_to(standin_folder().parents[1])
    shutil.copytree(standin_folder(), legacy)
    lines: list[str] = []
    assert ensure_task297("auto", log=lines.append) == standin_folder()
    assert len(lines) == 1 and str(legacy) in lines[0] and "earlier version" in lines[0]
    with pytest.raises(RuntimeError, match="earlier version"):
        ensure_task297("official")


def test_quickstart_steps_offline_leave_the_user_home_empty_and_official_api_downloads(tmp_path, standin_home,
                                                                                     tiny_scan):
    """02, 03 and 06 as a new user runs them (subprocesses, HOME and TOTALSEG_HOME_DIR empty): nothing lands in
    the user's home, and the official python API run afterwards does not find stand-in weights there: it
    tries its own download, which fails offline."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("TOTALSEG_HOME_DIR")
    py = sys.executable
    runs = [[py, "02_export_model.py"],
            [py, "06_inferenceAndPassport.py", "--input", str(tiny_scan), "--out", str(tmp_path / "m06"),
             "--result", str(tmp_path / "06.json")],
            [py, "03_vanilla_benchmark.py", "--input", str(tiny_scan), "--out", str(tmp_path / "m03"),
             "--result", str(tmp_path / "03.json"), "--repeats", "1", "--warmup", "0"]]
    for cmd in runs:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
        assert proc.returncode == 0, (cmd[1], proc.stderr[-2000:])
        assert "weights: STAND-IN" in proc.stdout or "standin" in proc.stdout, proc.stdout[-1000:]
    ts_home = home / ".totalsegmentator"
    assert not _ours_in(ts_home), _ours_in(ts_home)
    code = ("from totalsegmentator.python_api import totalsegmentator as t; "
            f"t({str(tiny_scan)!r}, {str(tmp_path / 'official_api.nii.gz')!r}, fast=True, ml=True, quiet=True)")
    api = subprocess.run([py, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert api.returncode != 0
    assert "Downloading model for Task 297" in api.stdout + api.stderr
    assert any(w in api.stderr for w in ("ConnectionError", "NameResolution", "Max retries", "ProxyError")), \
        api.stderr[-1500:]
    assert not list(ts_home.rglob("checkpoint_final.pth"))
