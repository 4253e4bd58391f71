"""``totalsegmentator()`` with TotalSegmentator 2.18's signature, run by this suite's exact pipeline (the fast
model, Task 297, 3 mm, the official arithmetic): the drop-in for ``totalsegmentator.python_api.totalsegmentator``.

    from common.python_api import totalsegmentator
    seg_img = totalsegmentator("ct.nii.gz", "seg.nii.gz", ml=True)             # or a nibabel image, output None
    seg_img, stats = totalsegmentator(nib.load("ct.nii.gz"), None, statistics=True)

It returns what the official function returns (the label image with the label-map extension; with
``statistics``, also the statistics dict) and writes what it writes for the same arguments (the same code as
totalseg-fast: common.cli.scan_outputs, common.cli.console_scan). The model session is built on the first call
and reused by every later call in the process with the same weights, configuration and device.

Concurrency: calls are serialised by a lock, one scan at a time per process (the session already uses every
core, and its predictor keeps buffers between tiles); calls from several threads are safe but do not overlap.
For parallel work use processes, totalseg-fast's folder mode or 06 on a Dask cluster.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
from nibabel import Nifti1Image

from common.cli.official_flags import FLAGS
from common.cli.scan_outputs import ScanOptions, check_options, is_dicom_source, produce, write_report
from common.core.errors import InputError
from common.imaging.official_post import DICOM_TYPES, dicom_target

TASK = "total"


class Session(NamedTuple):
    """The model, its run configuration and the predictor built from them (one per process and key)."""

    spec: Any
    cfg: Any
    predictor: Any


_SESSIONS: dict[tuple, Session] = {}
_LOCK = threading.RLock()
_BUILDS = {"n": 0}


def session_builds() -> int:
    """How many model sessions this process has built (a later call with the same key builds none)."""
    return _BUILDS["n"]


def _session(weights: str, config: Path | None, quiet: bool, precision: str | None = None) -> Session:
    """The cached session for (weights, configuration): built once per process (model, ONNX file, predictor)."""
    from common.core.paths import DEFAULT_ONNX, OPTIMIZED_CONFIG
    from common.inference.model_cache import ensure_onnx, prepare_model
    from common.inference.predictor_factory import build_predictor
    from common.inference.run_config import RunConfig, load_config
    from common.inference.weights import PROJECT_HOME_ENV

    cfg_path = config or (OPTIMIZED_CONFIG if OPTIMIZED_CONFIG.exists() else None)
    key = (weights, str(cfg_path), precision, *(os.environ.get(v) for v in (PROJECT_HOME_ENV, "TOTALSEG_HOME_DIR",
                                                                  "TOTALSEG_WEIGHTS_PATH")))
    if key not in _SESSIONS:
        log = (lambda m: None) if quiet else print
        cfg = (load_config(cfg_path) if cfg_path else RunConfig.fastest_exact()).with_precision(precision)
        spec = prepare_model(weights, log=log)
        onnx = ensure_onnx(spec, DEFAULT_ONNX, log=log) if cfg.backend == "onnxruntime" else None
        _SESSIONS[key] = Session(spec, cfg, build_predictor(cfg, spec, onnx))
        _BUILDS["n"] += 1
    return _SESSIONS[key]


# parameter -> (value that this tool runs, the FLAGS entry whose one-line reason applies, or a reason)
_NOT_RUN: dict[str, tuple[Any, str]] = {
    "fastest": (False, "fastest"), "body_seg": (False, "body_seg"), "roi_subset_robust": (None, "roi_subset_robust"),
    "robust_crop": (False, "robust_crop"), "higher_order_resampling": (False, "higher_order_resampling"),
    "higher_order_resampling_LEGACY": (False, "higher_order_resampling_LEGACY"), "nora_tag": ("None", "nora_tag"),
    "license_number": (None, "license_number"), "test": (0, "test"), "model_size": ("big", "model_size"),
    "radiomics": (False, "radiomics"),
    "task": (TASK, "this tool runs only the task 'total' (the fast model, Task 297)"),
    "fast": (True, "this tool runs only the fast model (3 mm, Task 297); fast=False is the official 1.5 mm "
                   "model: use the official totalsegmentator() for it"),
    "plans": ("nnUNetPlans", "only the plans of the fast model (nnUNetPlans)"),
}


def _refuse(given: dict[str, Any]) -> None:
    """ValueError naming the first parameter set to something this tool does not run, and why."""
    for name, (runs, why) in _NOT_RUN.items():
        if given[name] != runs and not (name == "nora_tag" and given[name] is None):
            reason = FLAGS[why].refusal if why in FLAGS else why
            raise ValueError(f"{name}={given[name]!r}: {reason}")
    if given["device"] not in ("gpu", "cpu") and not str(given["device"]).startswith("gpu:"):
        raise ValueError(f"device={given['device']!r}: this tool runs on 'cpu' (or 'gpu' through ONNX Runtime's "
                         "CUDA provider with totalseg-fast --device gpu)")


def totalsegmentator(input: str | Path | Nifti1Image, output: str | Path | None = None, ml=False, nr_thr_resamp=1,
                     nr_thr_saving=6, fast=True, nora_tag="None", preview=False, task=TASK, roi_subset=None,
                     statistics: bool | str | Path = False, radiomics=False, crop_path=None, body_seg=False,
                     force_split=False, output_type="nifti", quiet=False, verbose=False, test=0,
                     skip_saving=False, device="gpu", license_number=None,
                     statistics_exclude_masks_at_border=True, no_derived_masks=False,
                     v1_order=False, fastest=False, roi_subset_robust=None, stats_aggregation="mean",
                     remove_small_blobs=False, statistics_normalized_intensities=False,
                     robust_crop=False, higher_order_resampling_LEGACY=False, higher_order_resampling=False,
                     save_probabilities=None, debug=False, report=None, statistics_extra=False, save_lowres=False,
                     resampling_order=1, plans="nnUNetPlans", model_size="big", *, weights: str = "auto",
                     config: str | Path | None = None, precision: str | None = None):
    """Segment ``input`` (a NIfTI path, a DICOM folder or zip, or a nibabel image) as TotalSegmentator 2.18's
    ``totalsegmentator(..., fast=True)`` does; see its command-line help for each parameter.

    ``output``: the masks folder, or with ``ml`` the label map file (with ``output_type`` "dicom_seg" or
    "dicom_rtstruct": the DICOM file); None writes nothing (statistics only where ``statistics`` is a path).
    Returns the label image ((x, y, z) uint8 in the input's grid, or the 3 mm grid with ``save_lowres``, with the
    label-map header extension), and with ``statistics`` the pair (image, statistics dict).
    Keyword-only extras: ``weights`` ("auto", "official" or "standin"), ``config`` (a run configuration file;
    default as totalseg-fast) and ``precision`` ("bf16": the network in bfloat16, opt-in and APPROXIMATE, refused
    without native bf16; a warning is printed even with ``quiet``). ``force_split``, ``no_derived_masks``, ``statistics_extra``, ``crop_path`` and
    ``debug`` change nothing for the fast total task (as in the official code); the parameters this tool does not
    run (another task, ``fast=False``, ``fastest``, ``body_seg``, a robust subset, ...) raise ValueError naming
    the parameter and why. ``device="gpu"`` without a GPU runs on the CPU with a note, as the official function.
    """
    given = dict(locals())
    _refuse(given)
    roi = list(roi_subset) if roi_subset is not None else None
    if roi is not None and not all(isinstance(n, str) for n in roi):
        raise ValueError("roi_subset must be a list of strings")
    types = [output_type] if isinstance(output_type, str) else list(output_type)
    if len(types) != 1 or types[0] not in ("nifti", *DICOM_TYPES):
        raise ValueError(f"output_type={output_type!r}: one of 'nifti', 'dicom_seg', 'dicom_rtstruct'")
    opts = ScanOptions(ml=bool(ml), output_type=types[0], statistics=bool(statistics), stats_aggregation=stats_aggregation,
                       stats_include_incomplete=not statistics_exclude_masks_at_border,
                       stats_normalized=bool(statistics_normalized_intensities), preview=bool(preview),
                       skip_saving=bool(skip_saving), save_lowres=bool(save_lowres), v1_order=bool(v1_order),
                       remove_small_blobs=None if remove_small_blobs is False or remove_small_blobs is None
                       else 200.0 if remove_small_blobs is True else float(remove_small_blobs),
                       nr_thr_saving=int(nr_thr_saving),
                       save_probabilities=Path(save_probabilities).absolute() if save_probabilities else None)
    try:
        check_options(opts, roi)
    except InputError as exc:
        raise ValueError(str(exc)) from None
    in_memory = isinstance(input, nib.spatialimages.SpatialImage)
    if opts.output_type in DICOM_TYPES and (in_memory or not is_dicom_source(Path(input))):
        raise ValueError(f"output_type={opts.output_type!r}: needs a DICOM series as input (a folder or a zip of "
                         "one), as the official function")
    if device != "cpu" and not quiet:
        print("No GPU detected. Running on CPU.")  # as the official function (the CPU pipeline is this tool's)
    t0 = time.perf_counter()
    with _LOCK:
        result = _run(input, Path(output) if output is not None else None, opts, roi, statistics,
                      int(nr_thr_resamp), int(resampling_order), weights, Path(config) if config else None, quiet,
                      precision)
    if report is not None:
        write_report(Path(report), input, Path(output) if output is not None else None, opts, roi,
                     time.perf_counter() - t0)
    return result


def _run(input, output: Path | None, opts: ScanOptions, roi: list[str] | None, statistics, nr_thr_resamp: int,
         resampling_order: int, weights: str, config: Path | None, quiet: bool, precision: str | None):
    from common.imaging.official_output import multilabel_image
    from common.imaging.validation import scan_from_image

    session = _session(weights, config, quiet, precision)
    label_map = {k: v for k, v in session.spec.labels.items() if k != 0}
    if roi is not None and set(roi) - set(label_map.values()):
        raise ValueError(f"roi_subset: unknown class name(s) {', '.join(sorted(set(roi) - set(label_map.values())))}")
    cfg = session.cfg.model_copy(deep=True)
    cfg.segment.resample_threads, cfg.segment.resample_order = nr_thr_resamp, resampling_order
    source = scan_from_image(input)[0] if isinstance(input, nib.spatialimages.SpatialImage) else Path(input)
    if cfg.approximate:
        print(f"warning: approximate ({cfg.precision} network): labels can differ from the official tool's")
    made = produce(source, opts, label_map, roi, session.spec, session.predictor, cfg)
    if not quiet:
        for w in made.run.warnings:
            print(f"warning: {w}")
    _write(made, opts, output, statistics, roi, session.spec, source)
    img = multilabel_image(made.labels, made.reference, made.label_map)
    return (img, made.stats) if opts.statistics else img


def _write(made, opts: ScanOptions, output: Path | None, statistics, roi, spec, source) -> None:
    """What the official function writes for these arguments, as one output set (common.cli.console_scan)."""
    from common.cli.console_scan import ScanTargets, owned_names, write_output_set

    stats_file = Path(statistics) if isinstance(statistics, (str, Path)) and not isinstance(statistics, bool) \
        else None
    if output is None:
        if stats_file is None:
            return  # nothing to write (the official function writes nothing either)
        opts = dataclasses.replace(opts, skip_saving=True, preview=False)
        output = stats_file.parent / "unused"
    output = dicom_target(opts.output_type, output)
    folder = output.parent if opts.single_file else output
    whole = None if opts.single_file or opts.skip_saving else output
    targets = ScanTargets(output, stats_file or folder / "statistics.json", folder / "preview_total.png",
                          folder / "passport.json", whole)
    scan = source if isinstance(source, Path) else Path("input")
    write_output_set(scan, made, opts, targets, owned_names({k: v for k, v in spec.labels.items() if k}), roi, spec)
