"""Run the official TotalSegmentator (PyTorch, nnU-Net) offline, as the reference.

Configured so that no network call happens: usage statistics off in TotalSegmentator's config.json,
weights already in place (see common.weights), and no version check exists in the python API.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import nibabel as nib

from common.weights import TRAINER, configure_offline_totalseg


def _register_trainer_class() -> None:
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


def _no_background_threads() -> None:
    """Stop tqdm's monitor thread. nnU-Net starts a multiprocessing Manager by fork; a fork taken while
    another Python thread holds a lock leaves the child waiting on it forever (seen here: a 03 run hung
    in its second scan with the Manager child blocked on a futex). Progress bars still work without it."""
    import tqdm

    tqdm.tqdm.monitor_interval = 0
    monitor = getattr(tqdm.tqdm, "monitor", None)
    if monitor is not None:
        monitor.exit()
        tqdm.tqdm.monitor = None


def run_official(input_path: str | Path, output_path: str | Path | None, *, device: str = "cpu",
                 quiet: bool = True, nr_threads_resampling: int = 1, nr_threads_saving: int = 6,
                 ) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """Segment one scan with the official python API (task 'total', fast=True); return (label image, info).

    ``output_path`` is written by TotalSegmentator itself as one multilabel NIfTI (ml=True); None skips
    saving. info holds the wall time in seconds.
    """
    configure_offline_totalseg()
    _register_trainer_class()
    _no_background_threads()
    from totalsegmentator.python_api import totalsegmentator

    sink = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        img = totalsegmentator(str(input_path), None if output_path is None else str(output_path), ml=True,
                               fast=True, task="total", device=device, quiet=quiet,
                               nr_thr_resamp=nr_threads_resampling, nr_thr_saving=nr_threads_saving,
                               skip_saving=output_path is None)
    wall = time.perf_counter() - t0
    return img, {"total_s": wall, "device": device}
