"""Run the official TotalSegmentator (PyTorch, nnU-Net) as the reference, isolated and under a time limit.

Every official call runs in a fresh Python process (``common.runs.official_worker``, started with
``subprocess`` in a new process group: spawned, never forked from this process), so that:
- nothing of the caller leaks into nnU-Net's forked pools (the suite's SIGTERM handler, busy thread
  pools, held locks: each of them has deadlocked a forked worker before);
- a stuck call is ended by killing the worker's whole process group after a time limit derived from the
  scan's size; the call raises ``OfficialCallError`` (one line) and the next call starts a fresh worker;
- the official tool reads the weights folder chosen by ``common.inference.weights`` and writes its config.json into
  the project's own TotalSegmentator home, never into the user's (see common/runs/official_worker.py).

One worker serves many calls (its imports take about 5 s), so a batch pays the start once; 03 starts one
per scan, which also makes the worker's peak RSS that scan's peak.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from common.core.paths import PROJECT_ROOT
from common.inference.weights import TRAINER

STARTUP_TIMEOUT_S = 300.0
BASE_TIMEOUT_S = 300.0       # start-up, loading and saving of one call
PER_TILE_TIMEOUT_S = 60.0    # about 6x the official tool's time per 112x112x128 tile on a 2-core CPU
UNKNOWN_SIZE_TIMEOUT_S = 3600.0


class OfficialCallError(RuntimeError):
    """The official call failed, timed out or its worker died; ``str()`` is one line."""


def register_trainer_class() -> None:
    """Give TotalSegmentator's trainer lookup table the Task 297 trainer class directly.

    nnU-Net finds a trainer by importing every trainer module; one of them (primus) imports timm, which
    imports torchvision. With the CPU build of torch pinned here, PyPI's torchvision (a CUDA build) cannot
    load, so that search fails although it would return this very class. TotalSegmentator's own
    `custom_trainers` table is consulted before the search, so registering the class there yields the
    identical network without touching torchvision. On a machine where torchvision imports this is a no-op
    in effect (same class either way).
    """
    from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs_NoMirroring as m
    from totalsegmentator import nnunet as ts_nnunet

    ts_nnunet.custom_trainers.setdefault(TRAINER, getattr(m, TRAINER))


def time_limit_for(path: str | Path) -> float:
    """Seconds an official call on ``path`` may take before it counts as stuck: 300 s + 60 s per tile of the
    scan's header size (NIfTI; Task 297's tiles at step 0.5, more than the official 0.8 runs), or one hour
    where the size is not known cheaply (DICOM, unreadable)."""
    from common.inference.tile_count import task297_geometry, tiles_for_geometry

    try:
        img = nib.load(str(path))
        shape, zooms = img.header.get_data_shape(), img.header.get_zooms()
        if len(shape) < 3 or not all(math.isfinite(z) and z > 0 for z in zooms[:3]):
            return UNKNOWN_SIZE_TIMEOUT_S
        tiles = tiles_for_geometry(shape[:3], zooms[:3], orientation="".join(nib.aff2axcodes(img.affine)),
                                   **task297_geometry(step=0.5))
        return BASE_TIMEOUT_S + PER_TILE_TIMEOUT_S * tiles
    except Exception:  # a directory (DICOM) or a file the official tool will reject itself
        return UNKNOWN_SIZE_TIMEOUT_S


@dataclass
class OfficialCall:
    """What one official call reported: its wall time (s, inside the worker) and peak RSS (bytes)."""

    total_s: float
    peak_rss_bytes: int
    worker_pid: int


class OfficialRunner:
    """A worker process running the official python API (task 'total', fast=True); one call at a time.

    ``weights_folder`` is the Task 297 results folder to use (common.inference.weights.ensure_task297);
    ``project_home`` the TotalSegmentator home the official tool may write its config.json into
    (common.inference.weights.project_totalseg_home). Use as a context manager: leaving it kills the worker group.
    """

    def __init__(self, weights_folder: Path, project_home: Path | None = None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        from common.inference.weights import prepare_project_home

        self.weights_root = Path(weights_folder).parents[1]  # <root>/Dataset297_.../<trainer>__<plans>__<cfg>
        self.home = prepare_project_home(project_home)
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+b")

    # -- process control -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        root = PROJECT_ROOT
        env = {**os.environ, "TOTALSEG_HOME_DIR": str(self.home), "TOTALSEG_WEIGHTS_PATH": str(self.weights_root),
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "PYTHONUNBUFFERED": "1"}
        self._log.seek(0)
        self._log.truncate()
        self.proc = subprocess.Popen([sys.executable, "-m", "common.runs.official_worker"], cwd=root, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True, text=True, encoding="utf-8")
        ready = self._read_answer(self.startup_timeout_s, "starting the official TotalSegmentator")
        if not ready.get("ok"):
            self.kill()
            raise OfficialCallError(ready.get("error", "the official worker failed to start"))

    def kill(self) -> None:
        """End the worker and every process of its group (nnU-Net's forked workers too)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()

    def close(self) -> None:
        self.kill()
        self._log.close()

    def __enter__(self) -> OfficialRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    # -- calls -------------------------------------------------------------------------------------------
    def _log_tail(self) -> str:
        self._log.flush()
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no output"

    def _read_answer(self, timeout_s: float, what: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise OfficialCallError(f"{what}: no answer within {timeout_s:.0f} s; the official worker "
                                        "was killed with its process group")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    code = self.proc.wait(timeout=30)
                    tail = self._log_tail()
                    self.kill()
                    raise OfficialCallError(f"{what}: the official worker exited (code {code}): {tail}")
                return json.loads(line)

    def segment(self, input_path: str | Path, output_path: str | Path, *, device: str = "cpu",
                timeout_s: float | None = None, nr_thr_resamp: int = 1, nr_thr_saving: int = 6, ml: bool = True,
                statistics: bool = False, roi_subset: list[str] | None = None, preview: bool = False,
                **options: Any) -> OfficialCall:
        """Segment ``input_path`` into the multilabel NIfTI ``output_path`` (written by the official tool), or
        with ``ml=False`` into the folder ``output_path`` (one mask per class); ``statistics`` writes its
        statistics.json, ``roi_subset`` and ``preview`` are the official options of those names; ``options``
        are further keyword arguments of the official ``totalsegmentator()`` (JSON values, e.g.
        ``output_type="dicom_seg"``, ``save_lowres=True``, ``resampling_order=3``).

        ``timeout_s`` defaults to ``time_limit_for(input_path)``. Raises OfficialCallError (one line, naming
        the scan) on failure or timeout; after a timeout or crash the next call starts a fresh worker.
        """
        limit = time_limit_for(input_path) if timeout_s is None else float(timeout_s)
        try:
            self.start()
            assert self.proc is not None and self.proc.stdin is not None
            req = {"input": str(input_path), "output": str(output_path), "device": device,
                   "nr_thr_resamp": nr_thr_resamp, "nr_thr_saving": nr_thr_saving, "ml": ml,
                   "statistics": statistics, "roi_subset": roi_subset, "preview": preview, "options": options}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            ans = self._read_answer(limit, f"{input_path}: official TotalSegmentator")
        except (BrokenPipeError, OSError) as exc:
            tail = self._log_tail()
            self.kill()
            raise OfficialCallError(f"{input_path}: the official worker stopped ({exc}): {tail}") from exc
        if not ans.get("ok"):
            raise OfficialCallError(f"{input_path}: official TotalSegmentator failed: {ans.get('error')}")
        rss = ans["peak_rss_bytes"]
        return OfficialCall(total_s=float(ans["total_s"]), peak_rss_bytes=int(rss["self"]) + int(rss["children"]),
                            worker_pid=self.pid or -1)


def run_official(input_path: str | Path, output_path: str | Path | None, *, weights_folder: Path | None = None,
                 runner: OfficialRunner | None = None, device: str = "cpu", timeout_s: float | None = None,
                 ) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """Segment one scan with the official tool in an isolated worker; return (label image, info).

    ``output_path`` None keeps the mask in a temporary file only. ``runner`` reuses a running worker
    (a batch pays the start-up once); else one is started for this call and ended after it. ``weights_folder``
    defaults to what ``common.inference.weights.ensure_task297('auto')`` selects. info: wall time (s) inside the worker,
    peak RSS (bytes), device.
    """
    own = runner is None
    if own:
        if weights_folder is None:
            from common.inference.weights import ensure_task297

            weights_folder = ensure_task297("auto")
        runner = OfficialRunner(weights_folder)
    try:
        with tempfile.TemporaryDirectory(prefix="ts-official-") as tmp:
            out = Path(output_path) if output_path is not None else Path(tmp) / "official.nii.gz"
            call = runner.segment(input_path, out, device=device, timeout_s=timeout_s)
            img = nib.load(str(out))
            img = nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.uint8), img.affine, img.header)
    finally:
        if own:
            runner.close()
    return img, {"total_s": call.total_s, "peak_rss_bytes": call.peak_rss_bytes, "device": device}
