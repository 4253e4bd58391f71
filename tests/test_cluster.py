"""Issue 13: 06's batch (and totalseg-fast's folder mode) on a Dask LocalCluster of 2 single-threaded workers.

The same masks as the single-process run, the same records, each worker's session built once, resume across
the two paths, a worker killed mid-scan (SIGKILL) and Ctrl-C on the client. Inputs are crops of the shared
real CT made here; the network is the small-tile stand-in (conftest), so that clusters start and finish fast.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.processes import default_sigint, live_processes

from common.core.atomic import leftover_temp_files
from common.inference.run_config import RunConfig, save_config
from common.inference.weights import PROJECT_HOME_ENV
from common.records.passport import load_passport
from common.records.results import read_result

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
GOOD = [f"scan_{i}" for i in range(4)]
CLUSTER = ["--workers", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory, example_ct_sm) -> Path:
    """Four distinct small crops of the real CT and one file that is not a scan."""
    d = tmp_path_factory.mktemp("cluster_scans")
    img = nib.load(example_ct_sm)
    for i, name in enumerate(GOOD):
        nib.save(img.slicer[20 + 6 * i:90 + 6 * i, 20:80, 0:24], d / f"{name}.nii.gz")
    (d / "broken.nii.gz").write_bytes(b"not a scan")
    return d


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """06's default configuration on one thread, as each single-threaded worker runs it: torch's float32 results
    depend on the thread count in their last bits, so equal masks need equal threads."""
    cfg = RunConfig.fastest_exact()
    cfg.torch_threads = 1
    return save_config(cfg, tmp_path_factory.mktemp("cluster_cfg") / "config.json")


def _base(scans: Path, onnx: Path, config: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(scans), "--out", str(out), "--result", str(out / "06.json"), "--onnx", str(onnx),
            "--config", str(config), "--weights", "standin", *extra]


def _mask(out: Path, scan_id: str) -> nib.Nifti1Image:
    return nib.load(out / f"{scan_id}_seg.nii.gz")


def test_a_cluster_batch_gives_the_single_process_masks_and_records(scans, config, tmp_path, tiny_onnx_model,
                                                                      in_tiny_home, capsys):
    s06 = importlib.import_module("06_inferenceAndPassport")
    one, dask = tmp_path / "one", tmp_path / "dask"
    assert s06.main(_base(scans, tiny_onnx_model, config, one, "--max-points", "50")) == 1
    code = s06.main(_base(scans, tiny_onnx_model, config, dask, "--max-points", "50", *CLUSTER))
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    r1, r2 = read_result(one / "06.json"), read_result(dask / "06.json")
    assert r2["complete"] is True
    assert [(s["scan_id"], s["status"]) for s in r1["scans"]] == [(s["scan_id"], s["status"]) for s in r2["scans"]]
    (bad,) = [s for s in r2["scans"] if s["status"] == "failed"]
    assert bad["scan_id"] == "broken" and "broken.nii.gz" in bad["error"] and "\n" not in bad["error"]
    for scan_id in GOOD:
        a, b = _mask(one, scan_id), _mask(dask, scan_id)
        assert np.array_equal(a.affine, b.affine)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), scan_id  # voxel for voxel
        assert load_passport(one / f"{scan_id}_passport.json").structures == \
            load_passport(dask / f"{scan_id}_passport.json").structures
    cluster = r2["machine"]["cluster"]
    assert cluster["kind"] == "local" and cluster["cores"] == 2 and cluster["start_s"] > 0
    assert len(cluster["workers"]) == 2
    assert [w["sessions_built"] for w in cluster["workers"]] == [1, 1]  # once per worker, not per scan
    assert sum(w["scans"] for w in cluster["workers"]) == 5 and all(w["host"] for w in cluster["workers"])
    tp = r2["summary"]["throughput"]
    assert tp["scans_ok"] == 4 and tp["cores"] == 2 and tp["scans_per_hour"] > 0
    assert tp["scans_per_core_hour"] == pytest.approx(tp["scans_per_hour"] / 2)
    assert not leftover_temp_files(dask)

    # resume across the two paths: the cluster finds the single-process outputs up to date
    assert s06.main(_base(scans, tiny_onnx_model, config, one, "--max-points", "50", *CLUSTER)) == 1
    r3 = read_result(one / "06.json")
    assert sorted(s["scan_id"] for s in r3["skipped"]) == GOOD
    assert all(s["reason"].startswith("up to date") for s in r3["skipped"])
    assert [s["scan_id"] for s in r3["scans"]] == ["broken"]


@pytest.mark.parametrize("argv, phrase", [
    (["--workers", "2", "--threads", "2"], "4 threads on 2 cores"),
    (["--threads", "1"], "--threads needs --workers"),
    (["--scheduler", "tcp://127.0.0.1:9", "--workers", "1"], "give one of them"),
])
def test_bad_cluster_options_are_one_line(scans, config, tmp_path, tiny_onnx_model, in_tiny_home, capsys, argv,
                                          phrase):
    s06 = importlib.import_module("06_inferenceAndPassport")
    assert s06.main(_base(scans, tiny_onnx_model, config, tmp_path / "o", *argv)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and phrase in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_an_unreachable_scheduler_is_one_line_within_the_time_limit(scans, config, tmp_path, tiny_onnx_model,
                                                                    in_tiny_home, capsys, monkeypatch):
    from common.runs import cluster
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 3)
    s06 = importlib.import_module("06_inferenceAndPassport")
    t0 = time.perf_counter()
    code = s06.main(_base(scans, tiny_onnx_model, config, tmp_path / "o", "--scheduler", "tcp://127.0.0.1:9"))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and time.perf_counter() - t0 < 60
    assert lines and "--scheduler tcp://127.0.0.1:9" in lines[-1] and "Traceback" not in "\n".join(lines)
    assert read_result(tmp_path / "o" / "06.json")["complete"] is False  # the record says it did not finish


def _processes_with(marker: str) -> list[int]:
    """Live processes of one 06 run: it and every process it started carry ``marker`` in their environment."""
    return live_processes(f"TS_BENCH_TEST_MARKER={marker}")


def _start(scans: Path, onnx: Path, config: Path, out: Path, home: Path, marker: str) -> subprocess.Popen:
    env = {**os.environ, PROJECT_HOME_ENV: str(home), "TS_BENCH_TEST_MARKER": marker}
    # many boundary points: each scan's passport takes a few seconds, so that a kill lands mid-scan
    cmd = [sys.executable, str(ROOT / "06_inferenceAndPassport.py"),
           *_base(scans, onnx, config, out, "--max-points", "20000", *CLUSTER)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)


def _scan_in_progress(out: Path, proc: subprocess.Popen, timeout_s: float = 180) -> tuple[str, int]:
    """(scan id, pid of the worker process segmenting it): a good scan whose lock is held (its .pid file names
    the holder) and whose run record, written last, does not exist yet."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        assert proc.poll() is None, proc.stderr.read().decode()
        for pid_file in (out / ".locks").glob("*.pid") if (out / ".locks").is_dir() else []:
            scan_id = pid_file.stem
            try:
                pid = int(pid_file.read_text(encoding="utf-8") or 0)
            except (OSError, ValueError):
                continue
            if scan_id in GOOD and pid not in (0, proc.pid) and not (out / f"{scan_id}_run.json").exists() \
                    and Path(f"/proc/{pid}").exists():
                return scan_id, pid
        time.sleep(0.01)
    raise AssertionError(f"no scan started within {timeout_s} s")


def test_a_worker_killed_mid_scan_loses_nothing_and_the_scan_is_retried(scans, config, tmp_path, tiny_onnx_model,
                                                                        tiny_standin_home):
    out, marker = tmp_path / "out", uuid.uuid4().hex
    proc = _start(scans, tiny_onnx_model, config, out, tiny_standin_home, marker)
    try:
        scan_id, pid = _scan_in_progress(out, proc)
        os.kill(pid, signal.SIGKILL)
        stdout, err = proc.communicate(timeout=400)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    err, stdout = err.decode("utf-8", "replace"), stdout.decode("utf-8", "replace")
    assert proc.returncode == 1, err  # the broken file
    assert "Traceback" not in err
    res = read_result(out / "06.json")
    assert res["complete"] is True
    ids = [s["scan_id"] for s in res["scans"]]
    assert sorted(ids) == sorted([*GOOD, "broken"])  # every scan exactly once
    rec = {s["scan_id"]: s for s in res["scans"]}
    assert all(rec[i]["status"] == "ok" for i in GOOD)
    assert rec[scan_id]["attempts"] == 2 and "died" in rec[scan_id]["retried_because"], rec[scan_id]
    assert rec[scan_id]["interrupted_attempt"] == f"process {pid}"  # the killed worker, named by its lock
    assert f"{scan_id} was retried" in stdout
    for i in GOOD:  # complete outputs under final names, nothing half-written
        assert np.asanyarray(_mask(out, i).dataobj).shape == nib.load(scans / f"{i}.nii.gz").shape
        load_passport(out / f"{i}_passport.json")
        assert json.loads((out / f"{i}_run.json").read_text(encoding="utf-8"))
    assert leftover_temp_files(out) == []
    workers = res["machine"]["cluster"]["workers"]
    assert all(w["sessions_built"] == 1 for w in workers) and len(workers) >= 2  # the restarted one: its own
    assert _processes_with(marker) == []  # the cluster is gone with the client


def test_ctrl_c_on_the_client_cancels_the_batch_cleanly(scans, config, tmp_path, tiny_onnx_model, tiny_standin_home):
    out, marker = tmp_path / "out", uuid.uuid4().hex
    proc = _start(scans, tiny_onnx_model, config, out, tiny_standin_home, marker)
    try:
        _scan_in_progress(out, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    err = err.decode("utf-8", "replace")
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert "Traceback" not in err and lines[-1].startswith("interrupted (SIGINT)"), lines[-3:]
    res = read_result(out / "06.json")
    assert res["complete"] is False and res["interrupted"] == "SIGINT"
    deadline = time.time() + 30
    while _processes_with(marker) and time.time() < deadline:  # worker processes exit with their nanny
        time.sleep(0.2)
    assert _processes_with(marker) == []
    for m in out.glob("*_seg.nii.gz"):  # what was written is whole
        np.asanyarray(nib.load(m).dataobj)


def test_the_console_folder_mode_on_a_cluster(scans, config, tmp_path, tiny_onnx_model, in_tiny_home, capsys):
    """totalseg-fast -i FOLDER --ml --workers 2: each scan's label map equals 06's single-process mask; the
    broken file is one line and the rest go on."""
    from common.cli.console import main

    s06 = importlib.import_module("06_inferenceAndPassport")
    assert s06.main(_base(scans, tiny_onnx_model, config, tmp_path / "one", "--no-passport")) == 1
    capsys.readouterr()
    code = main(["-i", str(scans), "-o", str(tmp_path / "ts"), "--ml", "--weights", "standin", "--onnx",
                 str(tiny_onnx_model), "--config", str(config), "-q", *CLUSTER])
    err = capsys.readouterr().err
    assert code == 1, err
    failed = [ln for ln in err.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1 and "broken.nii.gz" in failed[0] and "Traceback" not in err
    for scan_id in GOOD:
        ours = nib.load(tmp_path / "ts" / scan_id / "segmentations.nii.gz")
        assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(_mask(tmp_path / "one", scan_id).dataobj))


def test_a_running_scheduler_joined_through_its_scheduler_file(scans, config, tmp_path, tiny_onnx_model,
                                                                tiny_standin_home, capsys, monkeypatch):
    """`dask scheduler --scheduler-file F` and one `dask worker` started as users start them; 06 --scheduler F
    segments the batch there, and the worker built its session once."""
    monkeypatch.setenv(PROJECT_HOME_ENV, str(tiny_standin_home))
    marker = uuid.uuid4().hex
    env = {**os.environ, "TS_BENCH_TEST_MARKER": marker}
    dask_cli = str(Path(sys.executable).parent / "dask")
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([dask_cli, "scheduler", "--scheduler-file", str(sched_file), "--port", "0",
                               "--dashboard-address", ":0", "--no-show"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert sched_file.exists(), "the scheduler did not start"
        procs.append(subprocess.Popen([dask_cli, "worker", "--scheduler-file", str(sched_file), "--nworkers", "1",
                                       "--nthreads", "2", "--no-dashboard"], env=env, cwd=tmp_path,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(scheduler_file=str(sched_file), timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        s06 = importlib.import_module("06_inferenceAndPassport")
        code = s06.main(_base(scans, tiny_onnx_model, config, tmp_path / "out", "--no-passport", "--scheduler",
                              str(sched_file)))
        assert code == 1, capsys.readouterr().err
        res = read_result(tmp_path / "out" / "06.json")
        assert sorted(s["scan_id"] for s in res["scans"] if s["status"] == "ok") == GOOD
        cluster = res["machine"]["cluster"]
        assert cluster["kind"] == "scheduler" and cluster["scheduler"].startswith("tcp://")
        (worker,) = cluster["workers"]
        assert worker["sessions_built"] == 1 and worker["nthreads"] == 2 and worker["scans"] == 5
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=30)
    deadline = time.time() + 30
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.2)
    for pid in _processes_with(marker):  # nothing of the cluster may outlive the test
        os.kill(pid, signal.SIGKILL)
