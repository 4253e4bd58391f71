"""An output set is replaced as a whole or not at all (issue 24, items 1, 7 and 8).

- common.core.staging on its own: a staged folder swapped in, the user's own files kept, a failure leaving the
  old folder byte-identical; staged files renamed in order; leftovers of a killed run removed.
- totalseg-fast and 06 on a real full disk (a small tmpfs, where the test runs as root) and with an injected
  ENOSPC in the writer (everywhere): ``-o`` is left exactly as it was, empty or the old set.
- Two concurrent totalseg-fast runs on one ``-o``: one succeeds, the other stops at once with one line naming it.
- File names at the filesystem's limit: temporary names never exceed it; a final name over it is refused
  before the work.
All inputs are crops of the shared real CT, made at test time; the network is the small-tile stand-in.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.core import staging
from common.core.atomic import atomic_path, atomic_write_text, name_max, name_too_long
from common.records.results import read_result

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> sha256); {} when it does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


# ------------------------------------------------------------------------------------------- staging


def _owned(name: str) -> bool:
    return name.endswith(".nii.gz") or name == "statistics.json"


def test_staged_folder_replaces_the_old_set_and_keeps_the_users_files(tmp_path):
    target = tmp_path / "segs"
    target.mkdir()
    for name in ("liver.nii.gz", "spleen.nii.gz", "statistics.json"):
        (target / name).write_text("old " + name)
    (target / "my_notes.txt").write_text("mine")
    with staging.StagedFolder(target, _owned) as staged:
        assert staged.parent == tmp_path and staged != target
        (staged / "liver.nii.gz").write_text("new liver")
        assert (target / "spleen.nii.gz").read_text() == "old spleen.nii.gz"  # untouched until the end
    assert sorted(p.name for p in target.iterdir()) == ["liver.nii.gz", "my_notes.txt"]
    assert (target / "liver.nii.gz").read_text() == "new liver" and (target / "my_notes.txt").read_text() == "mine"
    assert _hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_failure_leaves_the_old_folder_byte_identical(tmp_path, monkeypatch, exchange):
    if not exchange:  # the fallback where the filesystem has no atomic exchange (NFS, macOS)
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    target = tmp_path / "segs"
    target.mkdir()
    for i in range(5):
        (target / f"c{i}.nii.gz").write_bytes(os.urandom(100))
    before = _tree(target)
    with pytest.raises(OSError, match="No space"):
        with staging.StagedFolder(target, _owned) as staged:
            (staged / "c0.nii.gz").write_bytes(b"new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert _tree(target) == before and _hidden_leftovers(tmp_path) == []
    with staging.StagedFolder(target, _owned) as staged:  # and a success with the same path works
        (staged / "c9.nii.gz").write_bytes(b"new")
    assert _tree(target).keys() == {"c9.nii.gz"} and _hidden_leftovers(tmp_path) == []


def test_a_new_folder_is_created_only_when_complete(tmp_path):
    target = tmp_path / "new" / "segs"
    with pytest.raises(RuntimeError):
        with staging.StagedFolder(target, _owned) as staged:
            (staged / "a.nii.gz").write_bytes(b"x")
            raise RuntimeError("killed half-way")
    assert not target.exists() and _hidden_leftovers(target.parent) == []
    with staging.StagedFolder(target, _owned) as staged:
        (staged / "a.nii.gz").write_bytes(b"x")
    assert _tree(target) == {"a.nii.gz": hashlib.sha256(b"x").hexdigest()}


def test_staged_files_go_in_place_in_order_after_the_obsolete_ones_are_removed(tmp_path):
    (tmp_path / "s_run.json").write_text("old record")
    (tmp_path / "s_seg.nii.gz").write_text("old mask")
    (tmp_path / "t_seg.nii.gz").write_text("another scan's")
    with pytest.raises(OSError):
        with staging.StagedFiles(tmp_path, "s_run.json", remove_first=(tmp_path / "s_run.json",)) as stage:
            stage.path("s_seg.nii.gz").write_text("new mask")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "s_run.json").read_text() == "old record" and (tmp_path / "s_seg.nii.gz").read_text() == \
        "old mask"
    with staging.StagedFiles(tmp_path, "s_run.json", remove_first=(tmp_path / "s_run.json",)) as stage:
        stage.path("s_seg.nii.gz").write_text("new mask")
        stage.path("s_run.json").write_text("new record")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_run.json", "s_seg.nii.gz", "t_seg.nii.gz"]
    assert (tmp_path / "s_run.json").read_text() == "new record"
    assert (tmp_path / "t_seg.nii.gz").read_text() == "another scan's"


def test_leftovers_of_a_killed_run_are_removed_but_not_the_users_files(tmp_path):
    target = tmp_path / "segs"
    killed = Path(staging._new_folder_beside(target))
    (killed / "liver.nii.gz").write_text("half")
    moved = Path(staging._new_folder_beside(target))  # killed while moving the user's file over
    (moved / "my_notes.txt").write_text("mine")
    other = Path(staging._new_folder_beside(tmp_path / "segs.b"))  # another target's: not ours to remove
    notes = staging.remove_stale_staging(target, _owned)
    assert not killed.exists() and moved.exists() and other.exists()
    assert len(notes) == 2 and any(n.startswith("kept ") and "my_notes.txt" in n for n in notes)


# ------------------------------------------------------------------------------------------- names


def test_temporary_names_never_exceed_the_limit_of_a_final_name_that_fits(tmp_path):
    limit = name_max(tmp_path)
    for suffix in ("_seg.nii.gz", "_passport.json"):
        name = "é" * ((limit - len(suffix.encode())) // 2) + suffix  # 2 bytes per character: bytes, not chars
        assert len(name.encode()) <= limit and name_too_long(tmp_path / name) is None
        with atomic_path(tmp_path / name, suffix=".nii.gz" if name.endswith(".gz") else "") as tmp:
            assert len(tmp.name.encode()) <= limit
            tmp.write_bytes(b"data")
        assert (tmp_path / name).read_bytes() == b"data"
    too_long = tmp_path / ("a" * limit + ".json")
    problem = name_too_long(too_long)
    assert problem and f"{limit + 5} bytes" in problem and "\n" not in problem
    with pytest.raises(OSError):
        atomic_write_text(too_long, "x")
    assert _hidden_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def crops(tmp_path_factory, example_ct_sm) -> dict[str, Path]:
    """Two different small scans (crops of the real CT, one tile of the small-tile stand-in each)."""
    d = tmp_path_factory.mktemp("crops")
    img = nib.load(example_ct_sm)
    paths = {"a": d / "scan_a.nii.gz", "b": d / "scan_b.nii.gz"}
    nib.save(img.slicer[40:80, 30:70, 0:24], paths["a"])
    nib.save(img.slicer[50:90, 35:75, 4:28], paths["b"])
    return paths


@pytest.fixture
def fast(in_tiny_home, tiny_onnx_model):
    """totalseg-fast's main() in-process on the small-tile stand-in: (exit code, stderr)."""
    from common.cli.console import main

    def run(*argv: str) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([*argv, "--weights", "standin", "--onnx", str(tiny_onnx_model), "-q"])
        return code, err.getvalue()

    return run


def _enospc_after(n: int, real):
    """A writer that writes ``n`` files, then fails as a full disk does."""
    calls = {"n": 0}

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))
        return real(*args, **kwargs)

    return write


@pytest.mark.parametrize("old_set", [False, True], ids=["empty", "old-set"])
def test_totalseg_fast_injected_full_disk_leaves_o_as_it_was(tmp_path, crops, fast, monkeypatch, old_set):
    from common.imaging import official_output

    segs = tmp_path / "segs"
    if old_set:
        assert fast("-i", str(crops["a"]), "-o", str(segs), "--statistics")[0] == 0
        assert len(list(segs.glob("*.nii.gz"))) == 117
    before = _tree(segs)
    monkeypatch.setattr(official_output, "atomic_save_nifti", _enospc_after(40, official_output.atomic_save_nifti))
    code, err = fast("-i", str(crops["b"]), "-o", str(segs), "--statistics")
    assert code == 1
    (line,) = err.strip().splitlines()
    assert "No space left on device" in line and str(segs) in line and "earlier outputs are untouched" in line
    assert _tree(segs) == before and segs.exists() == old_set
    assert _hidden_leftovers(tmp_path) == []


@contextlib.contextmanager
def _small_disk(where: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``where`` (needs root); skips where mounting is not allowed."""
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real small filesystem needs root to mount a tmpfs; the injected-fault tests cover the code")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until about ``leave`` bytes are free."""
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))


def test_totalseg_fast_on_a_real_full_disk(tmp_path, crops, fast):
    with _small_disk(tmp_path / "disk", "4m") as disk:
        segs = disk / "segs"
        assert fast("-i", str(crops["a"]), "-o", str(segs))[0] == 0
        before = _tree(segs)
        used = sum((segs / n).stat().st_blocks * 512 for n in before)
        _fill(disk, used // 2)  # room for about half of a second set
        code, err = fast("-i", str(crops["b"]), "-o", str(segs))
        assert code == 1 and len(err.strip().splitlines()) == 1 and "No space left" in err
        assert _tree(segs) == before and _hidden_leftovers(disk) == []
        _fill(disk, 0)
        (disk / "filler").unlink()
        _fill(disk, 1024)  # less than the masks need at least: refused before the work
        t0 = time.perf_counter()
        code, err = fast("-i", str(crops["b"]), "-o", str(segs))
        assert code == 1 and "not enough free space" in err and "117 masks" in err
        assert _tree(segs) == before and _hidden_leftovers(disk) == []
        print(f"refused in {time.perf_counter() - t0:.1f} s: {err.strip()}")


def _run_06(*argv: str) -> tuple[int, dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = importlib.import_module("06_inferenceAndPassport").main([*argv, "--weights", "standin"])
    return code, read_result(argv[argv.index("--result") + 1]), out.getvalue()


def test_06_on_a_real_full_disk_leaves_no_partial_scan_output(tmp_path, crops, in_tiny_home):
    with _small_disk(tmp_path / "disk", "4m") as disk:
        out = disk / "out"
        base = ["--input", str(crops["a"]), "--out", str(out), "--onnx", str(tmp_path / "m.onnx"),
                "--config", str(_pytorch_config(tmp_path))]
        code, _, _ = _run_06(*base, "--result", str(tmp_path / "1.json"))
        assert code == 0
        before = _tree(out)
        assert {"scan_a_seg.nii.gz", "scan_a_passport.json", "scan_a_run.json"} <= before.keys()
        _fill(disk, 8 * 1024)
        code, res, _ = _run_06(*base, "--result", str(tmp_path / "2.json"), "--force")
        (scan,) = res["scans"]
        assert code == 1 and scan["status"] == "failed" and "No space left" in scan["error"]
        assert _tree(out) == before and _hidden_leftovers(out) == []
        (disk / "filler").unlink()
        shutil.rmtree(out)
        _fill(disk, 8 * 1024)  # a first run that fails: nothing of it remains
        code, res, _ = _run_06(*base, "--result", str(tmp_path / "3.json"))
        assert code == 1 and res["scans"][0]["status"] == "failed"
        assert [p for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts] == []


def _pytorch_config(tmp_path: Path) -> Path:
    from common.inference.run_config import RunConfig, save_config

    return save_config(RunConfig(backend="pytorch", name="test"), tmp_path / "pytorch.json")


def test_06_refuses_an_output_name_over_the_limit_before_the_work_and_runs_one_at_it(tmp_path, example_ct_sm,
                                                                                   in_tiny_home):
    limit = name_max(tmp_path)
    scans = tmp_path / "scans"
    scans.mkdir()
    img = nib.load(example_ct_sm).slicer[40:80, 30:70, 0:24]
    fits = "f" * (limit - len("_passport.json")) + ".nii.gz"  # its longest output name is exactly at the limit
    over = "o" * (limit - len("_passport.json") + 3) + ".nii.gz"  # the input fits, its _passport.json does not
    for name in (fits, over):
        nib.save(img, scans / name)
    code, res, _ = _run_06("--input", str(scans), "--out", str(tmp_path / "out"), "--result",
                           str(tmp_path / "r.json"), "--config", str(_pytorch_config(tmp_path)))
    by_file = {Path(s["file"]).name: s for s in res["scans"]}
    assert code == 1 and by_file[fits]["status"] == "ok"
    refused = by_file[over]
    assert refused["status"] == "failed" and "over the" in refused["error"] and "shorten the input's name" in \
        refused["error"] and "File name too long" not in refused["error"]
    assert refused.get("median") is None  # refused before any work
    assert (tmp_path / "out" / (fits[:-7] + "_passport.json")).exists()
    assert _hidden_leftovers(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------- concurrency


def test_two_concurrent_runs_on_one_o_one_succeeds_the_other_names_it(tmp_path, crops, tiny_standin_home,
                                                                      tiny_onnx_model):
    from common.inference.weights import PROJECT_HOME_ENV

    segs = tmp_path / "segs"
    env = {**os.environ, PROJECT_HOME_ENV: str(tiny_standin_home)}

    def start(scan: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "common.cli.console", "-i", str(scan), "-o", str(segs),
                                 "--weights", "standin", "--onnx", str(tiny_onnx_model), "-q"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start(crops["a"])
    pid_file = tmp_path / ".locks" / "segs.pid"
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_file.exists(), first.communicate(timeout=60)
        first.send_signal(signal.SIGSTOP)  # the first run holds -o and is slow: the second must not wait for it
        try:
            second = start(crops["b"])
            _, err2 = second.communicate(timeout=300)
        finally:
            first.send_signal(signal.SIGCONT)
        _, err1 = first.communicate(timeout=300)
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()
    assert first.returncode == 0, err1
    assert second.returncode == 2
    (line,) = err2.strip().splitlines()
    assert str(segs) in line and "another totalseg-fast run" in line and f"process {first.pid}" in line
    assert str(crops["a"]) in line  # the other run named by its command
    masks = sorted(segs.glob("*.nii.gz"))
    assert len(masks) == 117 and _hidden_leftovers(tmp_path) == []
    shape = nib.load(crops["a"]).shape
    assert all(nib.load(m).shape == shape for m in masks[:3])  # the first run's scan, not the second's
    labels = sum(np.asanyarray(nib.load(m).dataobj).astype(np.int64) for m in masks)
    assert labels.max() <= 1  # one complete set: every voxel in at most one class mask
