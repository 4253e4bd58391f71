"""totalseg-fast's work on one scan: where its outputs go, segmenting it, and writing its output set as a whole.

One scan's outputs (masks or the --ml file, statistics.json, preview_total.png, passport.json) are written into a
staging folder beside the target and put in place only when all are written (common.core.staging): a scan that
fails, a full disk or a kill leaves ``-o`` as it was, empty or the earlier set, never a mix. Runs in-process or as
a task on a Dask worker (common.runs.cluster).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

from common.cli.scan_outputs import ScanOptions, is_dicom_source
from common.core.atomic import TMP_PREFIX, name_too_long
from common.core.errors import InputError
from common.imaging.official_post import DICOM_TYPES, dicom_target

ML_NAME_IN_FOLDER_MODE = "segmentations.nii.gz"
FOLDER_MODE_NAMES = {"ml": ML_NAME_IN_FOLDER_MODE, "dicom_seg": "segmentations_seg.dcm",
                     "dicom_rtstruct": "segmentations_rtstruct.dcm"}
EXTRA_NAMES = ("statistics.json", "preview_total.png", "passport.json")


class ScanTargets(NamedTuple):
    """Where one scan's outputs go. ``folder``: the folder replaced as a whole (the mask folder, or <o>/<scan
    id>/ of a folder run); None for one --ml file, whose outputs are single files beside it."""

    seg: Path  # the mask folder, or the --ml label map file
    statistics: Path
    preview: Path
    passport: Path
    folder: Path | None


def is_folder_mode(args: argparse.Namespace, batch) -> bool:
    """True unless -i is one scan itself (a file, a DICOM series folder or a zip)."""
    return not (len(batch.scans) == 1 and batch.scans[0] == Path(args.input))


def targets_for(args: argparse.Namespace, batch, scan: Path, opts: ScanOptions) -> ScanTargets:
    """Where one scan's outputs go. One scan: -o is the masks folder (or the --ml / DICOM file), extras beside it.
    A folder of scans: everything of a scan in <o>/<scan id>/ (one-file outputs named as FOLDER_MODE_NAMES)."""
    if is_folder_mode(args, batch):
        folder = args.output / batch.ids[scan]
        name = FOLDER_MODE_NAMES["ml" if opts.output_type == "nifti" else opts.output_type]
        seg, whole = (folder / name if opts.single_file else folder), folder
    else:
        seg = dicom_target(opts.output_type, args.output)
        folder = seg.parent if opts.single_file else seg
        whole = None if opts.single_file else seg
    if opts.skip_saving:  # no masks: the folder is not replaced, single files are staged
        whole = None
    custom_stats = isinstance(opts.statistics, str) and not is_folder_mode(args, batch)
    return ScanTargets(seg, Path(opts.statistics) if custom_stats else folder / "statistics.json",
                       folder / "preview_total.png", folder / "passport.json", whole)


def owned_names(label_map: dict[int, str]) -> Callable[[str], bool]:
    """``owned(name)``: True for the entries of an output folder that belong to this tool's output set (every
    class mask it can write, the --ml file of a folder run, the extras, leftover temporary files)."""
    names = {f"{v}.nii.gz" for v in label_map.values()} | {*FOLDER_MODE_NAMES.values(), *EXTRA_NAMES}
    return lambda name: name in names or name.startswith(TMP_PREFIX)


@contextmanager
def staged(targets: ScanTargets, owned: Callable[[str], bool]) -> Iterator[ScanTargets]:
    """The same targets inside staging folders (common.core.staging); on leaving the block without an error,
    the whole set is put in place (``targets.folder`` swapped as a whole, single files renamed), else removed."""
    from common.core.staging import StagedFiles, StagedFolder

    with ExitStack() as stack:
        staging = stack.enter_context(StagedFolder(targets.folder, owned)) if targets.folder is not None else None
        groups: dict[Path, StagedFiles] = {}
        moved = []
        for path in targets[:4]:
            if staging is None and path.is_dir():
                moved.append(path)  # the mask folder with --skip_saving: nothing is written to it
            elif staging is not None and path == targets.folder:
                moved.append(staging)
            elif staging is not None and path.parent == targets.folder:
                moved.append(staging / path.name)
            else:
                if path.parent not in groups:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    groups[path.parent] = stack.enter_context(StagedFiles(path.parent, key=path.name))
                moved.append(groups[path.parent].path(path.name))
        yield ScanTargets(*moved, folder=staging)


def stale_staging_notes(targets: ScanTargets, owned: Callable[[str], bool]) -> list[str]:
    """Remove what killed runs left staged beside ``targets`` (the caller holds the output's lock)."""
    from common.core.staging import remove_stale_staging

    notes = []
    for path in {targets.folder or targets.seg, targets.statistics}:
        notes += remove_stale_staging(path, owned)
    return notes


def _check_room(vol, targets: ScanTargets, n_images: int) -> None:
    """Before the work: refuse (InputError, one line) when the output's filesystem has less free space than the
    ``n_images`` gzipped images need at least (common.imaging.official_output.min_nifti_bytes)."""
    import numpy as np

    from common.core.disk_space import check_free_space
    from common.imaging.official_output import min_nifti_bytes

    if n_images == 0:
        return
    need = min_nifti_bytes(int(np.prod(vol.shape[:3])), n_images)
    what = "the label map" if n_images == 1 else f"the {n_images} masks"
    check_free_space((targets.folder or targets.seg).parent, need, f"{what} (at least)")


def _n_images(opts: ScanOptions, selected: dict[int, str]) -> int:
    """How many images the scan's outputs hold: none with -ss, one file with --ml or DICOM, else one per class."""
    return 0 if opts.skip_saving else 1 if opts.single_file else len(selected)


def segment_scan(scan: Path, scan_id: str, targets: ScanTargets, opts: ScanOptions,
                 label_map: dict[int, str], roi: list[str] | None, spec, predictor, cfg) -> list[tuple[str, str]]:
    """Segment one scan and write its output set (``targets``, replaced as a whole). Returns the messages to
    print, as (kind, line): "warning" (always shown), "note" (unless -q) or "verbose" (-v). Raises InputError
    (one line) for a bad scan, OSError for outputs that cannot be written (nothing of them then remains)."""
    from common.cli.scan_outputs import produce
    from common.imaging import official_output as out

    for path in targets[:4]:
        problem = name_too_long(path)
        if problem:
            raise InputError(None, problem)
    if opts.output_type in DICOM_TYPES and not is_dicom_source(scan):
        raise InputError(scan, f"-ot {opts.output_type} needs a DICOM series as input (a folder or a zip of one), "
                               "as the official tool")
    owned = owned_names(label_map)
    messages = [("note", line) for line in stale_staging_notes(targets, owned)]
    t0 = time.perf_counter()
    selected = out.subset_map(label_map, roi)
    made = produce(scan, opts, label_map, roi, spec, predictor, cfg,
                   preflight=lambda vol: _check_room(vol, targets, _n_images(opts, selected)))
    messages += [("warning", f"warning: {w}") for w in made.run.warnings]
    t1 = time.perf_counter()
    t2 = write_output_set(scan, made, opts, targets, owned, roi, spec)
    t3 = time.perf_counter()
    stages = ", ".join(f"{k} {v:.2f}" for k, v in made.run.stages.items())
    if cfg.approximate:
        messages.append(("note", f"{scan.name}: approximate ({cfg.precision} network)"))
    messages.append(("verbose", f"{scan.name}: segmented in {t1 - t0:.1f} s ({stages}), written in {t2 - t1:.1f} s"
                     + (f", extras {t3 - t2:.1f} s" if t3 - t2 > 0.05 else "")))
    return messages


def write_output_set(scan: Path, made, opts: ScanOptions, targets: ScanTargets, owned: Callable[[str], bool],
                     roi: list[str] | None, spec) -> float:
    """Write a scan's output set (``made``: common.cli.scan_outputs.produce) into ``targets``, as a whole (see
    ``staged``). Returns the time (perf_counter) when the labels were written, before the extras."""
    with staged(targets, owned) as into:
        _write_labels(scan, made, opts, into)
        t_labels = time.perf_counter()
        _write_extras(scan, made, into, opts, roi, spec)
    if opts.save_probabilities is not None:  # -sp: its own path, as the official tool copies it there
        from common.inference.probabilities import save_probabilities

        save_probabilities(opts.save_probabilities, *made.run.result.probabilities)
    return t_labels


def _write_labels(scan: Path, made, opts: ScanOptions, into: ScanTargets) -> None:
    """The masks, the --ml label map or the DICOM object, into the staged targets (nothing with -ss)."""
    from common.imaging import official_output as out

    if opts.skip_saving:
        return  # -ss: no masks (the official --skip_saving), only the extras asked for
    if opts.output_type in DICOM_TYPES:
        from common.imaging.dicom import series_reference
        from common.imaging.official_post import write_dicom_output

        with series_reference(scan) as reference:
            write_dicom_output(opts.output_type, made.labels, made.selected, reference, into.seg,
                               made.reference.affine)
    elif opts.ml:
        out.write_multilabel(made.labels, made.reference, made.label_map, into.seg)
    else:
        out.write_class_masks(made.labels, made.reference, made.selected, into.seg, threads=opts.nr_thr_saving)


def _write_extras(scan: Path, made, into: ScanTargets, opts: ScanOptions, roi: list[str] | None, spec) -> None:
    """statistics.json, preview_total.png and passport.json, as asked for, into the staged targets."""
    import numpy as np

    from common.imaging import official_output as out

    run = made.run
    if made.stats is not None:
        out.write_statistics(made.stats, into.statistics)
    if opts.preview:
        from common.reporting.preview import write_preview

        lab3 = np.asanyarray(run.result.labels_model_res.dataobj)
        if roi is not None:
            lab3 = lab3 * np.isin(lab3, list(made.selected)).astype(lab3.dtype)
        write_preview(np.asanyarray(made.ct_3mm.dataobj), lab3, into.preview, title=scan.name)
    if opts.passport:
        from common.inference.precision import describe
        from common.records.passport import build_passport, save_passport, scan_metadata

        lab = run.result.labels_model_res
        model = {**spec.provenance(), "arithmetic": describe(made.precision)}
        save_passport(build_passport(np.asanyarray(lab.dataobj), lab.affine, spec.labels,
                                     scan=scan_metadata(scan, run.volume.image), model=model,
                                     resolution="model"), into.passport)


def segment_or_error(scan: Path, scan_id: str, targets: ScanTargets, opts: ScanOptions,
                     label_map: dict[int, str], roi: list[str] | None, spec, predictor, cfg) -> list | str:
    """segment_scan, in this process or on a Dask worker: its messages, or the one-line error of a bad scan (a
    string, so that a cluster's client tells a bad scan from a failure of the cluster); one bad scan never
    stops a folder run. KeyboardInterrupt and SystemExit pass through."""
    try:
        return segment_scan(scan, scan_id, targets, opts, label_map, roi, spec, predictor, cfg)
    except InputError as exc:
        return str(exc)
    except OSError as exc:  # a full disk, a folder that went read-only: one line naming the file
        return f"{targets.seg}: cannot write the outputs ({exc.strerror or type(exc).__name__}); nothing of this scan " \
               "was written, earlier outputs are untouched"
    except Exception as exc:  # one bad scan must not stop a folder run
        return f"{scan}: {type(exc).__name__}: {' '.join(str(exc).split())}"
