"""What one scan's output set holds, and the arrays it is written from, in the official tool's order
(TotalSegmentator 2.18, nnunet.py ``nnUNet_predict_image`` for the fast total task):

  segment -> [--remove_small_blobs on the 3 mm labels] -> fast statistics on the 3 mm labels and CT
  -> resample back (not with --save_lowres) -> undo canonical -> [--v1_order] -> masks / label map / DICOM.

Shared by totalseg-fast (common.cli.console_scan) and the python API (common.python_api), so that both give the
same labels for the same options.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np

from common.core.errors import InputError
from common.imaging.official_post import DEFAULT_BLOB_MM3, DICOM_TYPES


@dataclass(frozen=True)
class ScanOptions:
    """totalseg-fast's output flags (the official CLI's meanings), one scan's worth."""

    ml: bool = False
    output_type: str = "nifti"               # nifti | dicom_seg | dicom_rtstruct
    statistics: bool | str = False           # True, or the statistics.json path
    stats_aggregation: str = "mean"
    stats_include_incomplete: bool = False
    stats_normalized: bool = False           # the python API's statistics_normalized_intensities
    preview: bool = False
    passport: bool = False
    skip_saving: bool = False
    save_lowres: bool = False
    v1_order: bool = False
    remove_small_blobs: float | None = None  # mm³; None: off
    nr_thr_saving: int = 6
    save_probabilities: Path | None = None   # the npz path (and its .pkl beside it)

    @property
    def single_file(self) -> bool:
        """True when the output is one file (--ml label map, DICOM SEG or RTSTRUCT), not a mask folder."""
        return self.ml or self.output_type in DICOM_TYPES


def output_type_of(values: list[str] | None) -> str:
    """The one output type of ``-ot`` (space or comma separated); InputError for several or an unknown one."""
    types = [t for item in (values or ["nifti"]) for t in str(item).split(",") if t] or ["nifti"]
    unknown = [t for t in types if t not in ("nifti", *DICOM_TYPES)]
    if unknown:
        raise InputError(None, f"-ot/--output_type: unknown type {unknown[0]!r} (nifti, dicom_seg or dicom_rtstruct)")
    if len(set(types)) > 1:
        raise InputError(None, "-ot/--output_type: give one type per run (the official multi-type output with its "
                               "derived file names is not supported); run once per type")
    return types[0]


def scan_options(args: argparse.Namespace) -> ScanOptions:
    """ScanOptions from totalseg-fast's parsed flags; InputError (one line) for a combination the official tool
    refuses or this tool does not run."""
    rmb = args.remove_small_blobs
    opts = ScanOptions(ml=args.ml, output_type=output_type_of(args.output_type), statistics=args.statistics,
                       stats_aggregation=args.stats_aggregation, stats_include_incomplete=args.stats_include_incomplete,
                       preview=args.preview, passport=args.passport, skip_saving=args.skip_saving,
                       save_lowres=args.save_lowres, v1_order=args.v1_order,
                       remove_small_blobs=None if rmb is False or rmb is None else float(rmb),
                       nr_thr_saving=args.nr_thr_saving,
                       save_probabilities=Path(args.save_probabilities).absolute() if args.save_probabilities else None)
    check_options(opts, roi=args.roi_subset)
    return opts


def check_options(opts: ScanOptions, roi: list[str] | None) -> None:
    """The official tool's own refusals of option combinations, and -v1o only where it means what it says."""
    flag = {"save_lowres": "-sl/--save_lowres", "v1_order": "-v1o/--v1_order"}
    if opts.save_lowres and roi:
        raise InputError(None, f"{flag['save_lowres']}: not together with --roi_subset (as the official tool)")
    if opts.save_lowres and opts.output_type in DICOM_TYPES:
        raise InputError(None, f"{flag['save_lowres']}: only with nifti output (as the official tool)")
    if opts.v1_order and not (opts.ml and opts.output_type == "nifti"):
        raise InputError(None, f"{flag['v1_order']}: only with --ml (the v1 order is a label-map order; without "
                               "--ml the official tool writes v2-named masks holding v1 numbers)")
    if opts.remove_small_blobs is not None and not opts.remove_small_blobs > 0:
        raise InputError(None, "-rmb/--remove_small_blobs: the size must be a positive number of mm3 "
                               f"(default {DEFAULT_BLOB_MM3:g})")


def is_dicom_source(path: Path) -> bool:
    """Whether a scan path can be the reference of a DICOM output: a DICOM folder or a zip of one (not a NIfTI)."""
    return not (path.is_file() and not path.name.lower().endswith(".zip"))


class ScanProduct(NamedTuple):
    """What a scan's outputs are written from: ``labels`` (x, y, z) uint8 in ``reference``'s grid (the input's,
    or the 3 mm one with --save_lowres; v1 ids with --v1_order), ``label_map`` the ids -> names of the label map
    (v1 with --v1_order; the --roi_subset classes), ``selected`` the v2 classes for masks and DICOM, ``stats``
    the fast statistics (or None), ``ct_3mm`` the 3 mm CT (for statistics and the preview, else None)."""

    run: Any  # common.runs.scan_run.ScanRun
    labels: np.ndarray
    reference: nib.Nifti1Image
    label_map: dict[int, str]
    selected: dict[int, str]
    stats: dict | None
    ct_3mm: nib.Nifti1Image | None
    precision: str = "float32"  # the network's arithmetic (common.inference.precision)


def produce(source: Path | Any, opts: ScanOptions, label_map: dict[int, str], roi: list[str] | None, spec, predictor,
            cfg, preflight=None) -> ScanProduct:
    """Segment one scan (a path, or a validated common.imaging.volume.Volume) and derive what its outputs hold."""
    from common.imaging import official_output as out
    from common.imaging import official_post as post
    from common.runs.scan_run import run_scan

    selected = out.subset_map(label_map, roi)
    refine = None
    if opts.remove_small_blobs is not None:
        def refine(labels: np.ndarray, grid: nib.Nifti1Image) -> np.ndarray:
            return post.remove_small_blobs(labels, grid, label_map, opts.remove_small_blobs)

    run = run_scan(source, spec, predictor, cfg.segment, mask_path=None, preflight=preflight, refine=refine,
                   full_resolution=not opts.save_lowres, probabilities=opts.save_probabilities is not None)
    if opts.save_lowres:
        reference = post.lowres_image(run.result.labels_model_res, run.volume.image)
        labels = np.asanyarray(reference.dataobj)
    else:
        reference = run.volume.image
        labels = np.asanyarray(run.result.labels.dataobj).astype(np.uint8, copy=False)
    names = selected
    if opts.v1_order:
        labels = post.reorder_like_v1(labels, label_map)
        names = out.subset_map(post.v1_label_map(), roi)
    ct_3mm = stats = None
    if opts.statistics or opts.preview:
        from common.inference.preprocess import resample_to_spacing, to_canonical

        ct_3mm = resample_to_spacing(to_canonical(run.volume.image), spec.spacing_xyz,
                                     order=cfg.segment.resample_order, threads=cfg.segment.resample_threads)
    if opts.statistics:
        stats = out.statistics(run.result.labels_model_res, ct_3mm, roi,
                               exclude_masks_at_border=not opts.stats_include_incomplete, metric=opts.stats_aggregation,
                               normalized_intensities=opts.stats_normalized)
    return ScanProduct(run, labels, reference, names, selected, stats, ct_3mm, cfg.precision)


def write_report(path: Path, input_: Any, output: Path | None, opts: ScanOptions, roi: list[str] | None,
                 runtime_s: float) -> Path:
    """The official --report JSON (its own ``build_run_report``: versions, device, task, classes, runtime in s,
    the output folder's files), written atomically at ``path`` once the outputs are in place."""
    from totalsegmentator.python_api import build_run_report

    from common.core.atomic import atomic_write_json

    doc = build_run_report(input_, output, "total", "cpu", True, False, opts.ml, opts.output_type, roi, runtime_s,
                           save_lowres=opts.save_lowres)
    return atomic_write_json(Path(path).absolute(), doc)
