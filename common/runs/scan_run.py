"""One timed run of one scan (load + checks, segment, save the mask), shared by 04, 05 and 06, and where a
scan's mask goes."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.core.errors import InputError
from common.imaging.mask_io import save_labels
from common.imaging.official_output import official_header
from common.imaging.validation import AXES, check_memory, estimate_memory_bytes, load_scan
from common.imaging.volume import Volume
from common.inference.pipeline import SegmentResult, segment
from common.inference.run_config import SegmentOptions


@dataclass
class ScanRun:
    """One timed run of one scan: stage seconds, the segmentation and the loaded volume."""

    stages: dict[str, float]
    total_s: float
    result: SegmentResult
    volume: Volume
    warnings: list[str]


def run_scan(path: Path | Volume, spec, predictor, options: SegmentOptions, mask_path: Path | None = None,
             progress=None, preflight: Callable[[Volume], None] | None = None, **segment_kwargs) -> ScanRun:
    """Load + validate, segment, save the mask (atomically) — each stage timed in seconds. ``preflight(volume)``
    runs after the checks and before the segmentation (e.g. the free-space check of the outputs); it raises
    to refuse the scan. ``path`` may be a Volume already loaded and validated (the python API's nibabel input);
    ``segment_kwargs`` go to common.inference.pipeline.segment (``refine``, ``full_resolution``)."""
    t0 = time.perf_counter()
    vol, warnings = (path, []) if isinstance(path, Volume) else load_scan(path)
    check_extent_for(vol, spec)
    check_memory_for(vol, spec)
    if preflight is not None:
        preflight(vol)
    t1 = time.perf_counter()
    res = segment(vol.image, spec, predictor, options, progress=progress, **segment_kwargs)
    t2 = time.perf_counter()
    if mask_path is not None:
        save_labels(np.asanyarray(res.labels.dataobj), vol.affine, mask_path, header=official_header(vol.image))
    t3 = time.perf_counter()
    stages = {"load": t1 - t0, **res.timings, "save": t3 - t2}
    return ScanRun(stages=stages, total_s=t3 - t0, result=res, volume=vol, warnings=warnings)


def check_extent_for(vol: Volume, spec) -> None:
    """Refuse (InputError, one line) a scan that covers less than one model voxel (3 mm) along an axis: the
    resampled grid would be empty (typically a header whose voxel size is in the wrong unit, e.g. 0.001 mm)."""
    for axis, n, mm, target in zip(AXES, vol.shape[:3], vol.spacing[:3], spec.spacing_xyz, strict=True):
        if n * mm < target:
            raise InputError(vol.path, f"scan covers only {n * mm:.4g} mm along {axis} ({n} voxels of {mm:.4g} mm), "
                                       f"less than one {target:g} mm model voxel; check the voxel size in the header")


def check_memory_for(vol: Volume, spec) -> None:
    """Refuse (InputError, one line) a scan whose estimated peak memory exceeds the free RAM, before the
    pipeline allocates it, instead of being killed by the kernel half-way."""
    patch_xyz = tuple(reversed([spec.patch_size[i] for i in spec.transpose_backward]))
    est = estimate_memory_bytes(vol.shape[:3], vol.spacing[:3], spec.spacing_xyz, spec.num_classes, patch_xyz)
    check_memory(vol.path, est)


def labels_present(labels: np.ndarray) -> list[int]:
    """Non-zero label ids present in a label map (names are in the result's model["labels"])."""
    return [int(i) for i in np.flatnonzero(np.bincount(labels.ravel().astype(np.int64))) if i != 0]


def mask_path_for(out_dir: Path, scan_id: str) -> Path:
    """The mask of the scan whose batch id is ``scan_id`` (common.imaging.discovery)."""
    return Path(out_dir) / f"{scan_id}_seg.nii.gz"
