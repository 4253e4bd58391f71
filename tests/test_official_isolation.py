"""The official reference runs can never hang the suite.

- Forked children of a process with our SIGTERM handler get the default disposition back (the cause of the
  deadlock seen in nnU-Net's pools: a Python-level handler swallowed Pool.terminate()'s SIGTERM).
- Official calls run in an isolated worker process under a time limit: 10 calls in a row from a process with
  our handler and busy thread pools all finish; a stuck call (injected: the worker sleeps) fails only its
  scan, the batch goes on, and no process of the killed worker is left.

To keep this cheap, the official tool runs here on a stand-in whose plans use 32^3-voxel tiles (same
network and code path, 50x less compute per tile), kept in a temporary project home (conftest.py).
"""
from __future__ import annotations

import concurrent.futures
import importlib
import os
import signal
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.processes import live_processes
from threadpoolctl import threadpool_limits

from common.inference.tile_count import task297_geometry, tiles_for_geometry
from common.inference.weights import PROJECT_HOME_ENV, standin_folder
from common.records.results import read_result
from common.runs.official import OfficialCallError, OfficialRunner
from common.runs.official_worker import INJECT_HANG_ENV

pytestmark = pytest.mark.slow


def _sigterm_caught(pid: int) -> bool:
    """True if process ``pid`` has a handler for SIGTERM (bit 15 of SigCgt in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    raise AssertionError("no SigCgt line")


def test_forked_children_get_the_default_sigterm_back():
    from common.core.signals import exit_cleanly_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    try:
        exit_cleanly_on_sigterm()
        assert _sigterm_caught(os.getpid())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report whether it still catches SIGTERM, then leave without cleanup
            os.write(w, b"1" if _sigterm_caught(os.getpid()) else b"0")
            os._exit(0)
        os.close(w)
        caught_in_child = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
        assert caught_in_child == b"0"
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def tiny_home(tiny_standin_home) -> Path:
    return tiny_standin_home


@pytest.fixture(scope="module")
def tiny_scans(tmp_path_factory, example_ct_sm) -> Path:
    d = tmp_path_factory.mktemp("tiny_scans")
    img = nib.load(example_ct_sm)
    nib.save(img.slicer[45:75, 35:65, 5:25], d / "a_ct.nii.gz")  # 30 x 30 x 20 voxels of 3 mm: one 32^3 tile
    nib.save(img.slicer[50:90, 40:80, 8:28], d / "hang_ct.nii.gz")
    nib.save(img.slicer[60:100, 35:75, 2:22], d / "c_ct.nii.gz")
    return d


def _busy(stop: list[bool]) -> int:
    """A pool thread that keeps taking the GIL and BLAS's locks (small products), with short pauses so that
    the official worker still gets the CPU (the test limits BLAS to one thread: OpenBLAS's own threads
    spin-wait between products and made every official call 1.4-1.6x slower)."""
    a = np.random.default_rng(0).random((200, 200))
    n = 0
    while not stop:
        a = np.tanh(a @ a.T / 200)
        n += 1
        time.sleep(0.002)
    return n


def test_ten_official_calls_in_a_row_finish_with_our_handler_and_busy_threads(tiny_home, tiny_scans, tmp_path):
    from common.core.signals import exit_cleanly_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    stop: list[bool] = []
    exit_cleanly_on_sigterm()
    blas = threadpool_limits(limits=1, user_api="blas")  # this process only; the worker is a fresh process
    pool = concurrent.futures.ThreadPoolExecutor(2)
    busy = [pool.submit(_busy, stop) for _ in range(2)]
    times = []
    try:
        with OfficialRunner(standin_folder(tiny_home), project_home=tiny_home) as runner:
            for i in range(10):
                out = tmp_path / f"call_{i}.nii.gz"
                t0 = time.perf_counter()
                call = runner.segment(tiny_scans / "a_ct.nii.gz", out, timeout_s=120)
                times.append(time.perf_counter() - t0)
                assert out.exists() and call.total_s > 0
    finally:
        stop.append(True)
        pool.shutdown(wait=True)
        blas.restore_original_limits()
        signal.signal(signal.SIGTERM, previous)
    assert all(f.result() > 0 for f in busy)
    labels = np.asanyarray(nib.load(tmp_path / "call_9.nii.gz").dataobj)
    assert labels.shape == nib.load(tiny_scans / "a_ct.nii.gz").shape and labels.max() > 0
    print(f"10 official calls: median {np.median(times):.2f} s, max {max(times):.2f} s")


def _live_workers_of(home: Path) -> list[int]:
    """Live (not zombie) processes started for the official worker with ``home`` as project home."""
    return live_processes(f"{PROJECT_HOME_ENV}={home}", "common.runs.official_worker")


def test_a_stuck_official_call_fails_its_scan_and_the_batch_goes_on(tiny_home, tiny_scans, tmp_path, monkeypatch):
    monkeypatch.setenv(PROJECT_HOME_ENV, str(tiny_home))
    monkeypatch.setenv(INJECT_HANG_ENV, "hang_ct")
    s03 = importlib.import_module("03_vanilla_benchmark")
    t0 = time.perf_counter()
    code = s03.main(["--input", str(tiny_scans), "--out", str(tmp_path / "m03"), "--result", str(tmp_path / "03.json"),
                     "--repeats", "1", "--warmup", "0", "--weights", "standin", "--official-timeout", "20"])
    elapsed = time.perf_counter() - t0
    res = read_result(tmp_path / "03.json")
    by_id = {s["scan_id"]: s for s in res["scans"]}
    assert code == 1
    assert by_id["a_ct"]["status"] == "ok" and by_id["c_ct"]["status"] == "ok"
    stuck = by_id["hang_ct"]
    assert stuck["status"] == "failed" and "no answer within 20 s" in stuck["error"] and "\n" not in stuck["error"]
    assert "hang_ct.nii.gz" in stuck["error"]
    assert not (tmp_path / "m03" / "hang_ct_seg.nii.gz").exists()
    assert not list((tmp_path / "m03").glob(".tmp-*"))
    assert not _live_workers_of(tiny_home)
    assert elapsed < 180


def test_a_worker_that_dies_is_reported_in_one_line_and_replaced(tiny_home, tiny_scans, tmp_path):
    with OfficialRunner(standin_folder(tiny_home), project_home=tiny_home) as runner:
        runner.start()
        first = runner.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(OfficialCallError, match="a_ct.nii.gz") as err:
            runner.segment(tiny_scans / "a_ct.nii.gz", tmp_path / "x.nii.gz", timeout_s=60)
        assert "\n" not in str(err.value)
        runner.segment(tiny_scans / "a_ct.nii.gz", tmp_path / "y.nii.gz", timeout_s=120)
        assert runner.pid != first and (tmp_path / "y.nii.gz").exists()


def test_time_limit_grows_with_the_number_of_tiles():
    def estimate_tiles(shape, spacing):  # what common.runs.official.time_limit_for counts
        return tiles_for_geometry(shape, spacing, **task297_geometry(step=0.5))

    assert estimate_tiles((122, 101, 30), (3.0, 3.0, 3.0)) == 1
    assert estimate_tiles((512, 512, 500), (0.98, 0.98, 2.0)) > estimate_tiles((512, 512, 200), (0.98, 0.98, 2.0)) > 1
