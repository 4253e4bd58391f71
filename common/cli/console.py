"""totalseg-fast: ``TotalSegmentator --fast`` for the total task, with the same flags and the same outputs,
run by this suite's exact pipeline (the official arithmetic; the same segment() and fastest exact
configuration as 06_inferenceAndPassport.py).

  TotalSegmentator -i ct.nii.gz -o segs --fast          ->  totalseg-fast -i ct.nii.gz -o segs
  TotalSegmentator -i ct.nii.gz -o seg.nii.gz --fast --ml  ->  totalseg-fast -i ct.nii.gz -o seg.nii.gz --ml

Input (-i): a NIfTI file, a DICOM series folder (files with or without .dcm), a zip of a DICOM series, or a
folder of such scans (each into <o>/<scan id>/, one model session for all; a failing scan is reported and
the rest go on). Output (-o): a folder with one binary mask per class, <class name>.nii.gz, as the official
tool writes them (input header copied, uint8); with --ml one label map file with the official label-map
header extension (TotalSegmentator's load_multilabel_nifti reads its names).
An output set is replaced as a whole or not at all: it is written beside -o and swapped in once complete, so a
failed run, a full disk or a kill leaves -o as it was (masks of an earlier run are never mixed with new ones;
your own files in the folder are kept). A second run on the same -o stops at once, naming the first (lock:
.locks/ beside -o). Free space is checked against the outputs' size before the work.
--roi_subset: the official tool first crops with a second model; this tool segments everything and writes
(and counts in --statistics) only the named classes.
Exit code: 0 all done, 1 some scan failed, 2 bad options or input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

from common.cli.args import OneLineParser, check_outputs, positive_int, run_script
from common.cli.console_scan import is_folder_mode, segment_or_error, targets_for
from common.core.errors import InputError

PROG = "totalseg-fast"
TASK = "total"


def _version() -> str:
    try:
        ours = importlib.metadata.version("ts-bench")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    try:
        official = importlib.metadata.version("TotalSegmentator")
    except importlib.metadata.PackageNotFoundError:
        official = "not installed"
    return f"{PROG} {ours} (mirrors TotalSegmentator {official} --fast, task total)"


def build_parser() -> argparse.ArgumentParser:
    from common.cli.cluster_args import add_cluster_arguments
    from common.cli.official_flags import add_official_flags
    from common.cli.script_args import add_weights_argument

    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", dest="input", metavar="filepath",
                   help="CT: NIfTI file, DICOM folder, zip of a DICOM series, or a folder of scans")
    p.add_argument("-o", dest="output", metavar="directory", type=Path,
                   help="output folder (one mask per class), or with --ml the label map file; for a folder of "
                        "scans, each scan's outputs go to <o>/<scan id>/ (--ml: segmentations.nii.gz there)")
    p.add_argument("-ml", "--ml", action="store_true", help="save one multilabel image for all classes")
    p.add_argument("-s", "--statistics", nargs="?", const=True, default=False, metavar="FILE",
                   help="write statistics.json (volume in mm3 and mean intensity in HU per class, 0 for a class "
                        "touching the border) beside the output, or to FILE; computed as the official fast mode "
                        "does: on the 3 mm image, by TotalSegmentator's own statistics function")
    p.add_argument("-sa", "--stats_aggregation", choices=["mean", "median"], default="mean",
                   help="intensity aggregation in --statistics (default mean)")
    p.add_argument("-sii", "--stats_include_incomplete", action="store_true",
                   help="statistics also for classes that touch the border of the image")
    p.add_argument("-rs", "--roi_subset", nargs="+", metavar="NAME",
                   help="only these classes (space or comma separated), e.g. liver,spleen; see --help text above")
    p.add_argument("-p", "--preview", action="store_true",
                   help="write preview_total.png: labels over three orthogonal CT slices (under a second)")
    p.add_argument("-nr", "--nr_thr_resamp", type=positive_int, default=1, help="threads for resampling (default 1)")
    p.add_argument("-ns", "--nr_thr_saving", type=positive_int, default=6,
                   help="threads for writing the class masks (default 6)")
    p.add_argument("-f", "--fast", action="store_true",
                   help="accepted for compatibility: this tool always runs the fast (3 mm) model")
    p.add_argument("-ta", "--task", choices=[TASK], default=TASK, help="only 'total' (the fast model's task)")
    p.add_argument("-d", "--device", choices=["cpu", "gpu"], default="cpu",
                   help="cpu (default) or gpu: ONNX Runtime's CUDA provider (needs onnxruntime-gpu; without it "
                        "the command stops with one line, it never runs on the CPU silently)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("-v", "--verbose", action="store_true", help="print stage timings per scan")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--passport", action="store_true",
                   help="also write the anatomical passport (passport.json; per-structure centroid, axes, "
                        "boundary points in world mm), as 06 does")
    p.add_argument("--config", type=Path, default=None,
                   help="run configuration JSON (default: benchmarks/optimized_config.json from 05, else the "
                        "built-in fastest exact configuration; the same choice as 06)")
    p.add_argument("--precision", choices=["float32", "bf16"], default=None,  # common.inference.precision
                   help="float32: exact (default); bf16: the network in bfloat16, opt-in and APPROXIMATE "
                        "(refused where the CPU has no native bf16)")
    p.add_argument("--onnx", type=Path, default=None, help="ONNX model file (default models/task297.onnx, exported "
                                                             "from the weights on first use)")
    add_weights_argument(p)
    p.add_argument("-ss", "--skip_saving", action="store_true",
                   help="write no masks, only what else was asked for (e.g. --statistics into -o); -o is then not "
                        "replaced, so masks already there stay")
    p.add_argument("-lt", "--list-tasks", action="store_true", dest="list_tasks",
                   help="list the tasks this tool runs (one: total, the fast model) and exit")
    p.add_argument("-lc", "--list-classes", dest="list_classes", nargs="?", const=TASK, metavar="task",
                   help="list the classes of the task (index -> name, the official class map) and exit")
    add_cluster_arguments(p)
    add_official_flags(p)
    return p


def _listing(args: argparse.Namespace) -> str | None:
    """What --list-tasks / --list-classes print (the official class map for the names), or None."""
    if args.list_tasks:
        return f"{TASK}\tCT\tno licence\t117 classes (the fast model: Task 297, 3 mm; the only task of {PROG})"
    if args.list_classes is not None:
        if args.list_classes != TASK:
            raise InputError(None, f"--list-classes {args.list_classes}: {PROG} runs only the task {TASK}")
        from totalsegmentator.map_to_binary import class_map

        return "\n".join(f"{k}\t{v}" for k, v in sorted(class_map[TASK].items()))
    return None


def _roi_subset(names: list[str] | None, label_map: dict[int, str]) -> list[str] | None:
    if not names:
        return None
    wanted = [n for item in names for n in item.split(",") if n]
    unknown = [n for n in wanted if n not in set(label_map.values())]
    if unknown:
        raise InputError(None, f"--roi_subset: unknown class name(s) {', '.join(unknown)} "
                               f"(e.g. {', '.join(list(label_map.values())[:5])}, ...)")
    return wanted


def _check_device(device: str) -> list[str]:
    """ONNX Runtime providers for ``device``; RuntimeError (one line) when the GPU one is missing."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("--device gpu: ONNX Runtime has no CUDA provider here (install onnxruntime-gpu with a "
                           "matching CUDA, or use --device cpu)")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from common.cli.official_flags import refusal

    problem = refusal(args)
    if problem:
        parser.error(problem)
    try:
        listing = _listing(args)
    except InputError as exc:
        parser.error(str(exc))
    if listing is not None:
        print(listing)
        return 0
    if args.input is None or args.output is None:
        parser.error("the following arguments are required: -i, -o")
    say = _printer(args)

    from common.cli.args import fail

    with ExitStack() as held:  # the output's lock, for the whole run
        try:
            run = _prepare(args, say, held)
        except (InputError, OSError, RuntimeError) as exc:
            return fail(exc)
        return _segment_all(args, run, say)


def _segment_all(args: argparse.Namespace, run: _Prepared, say: Say) -> int:
    """Every scan, here or on the cluster; the summary line; the exit code."""
    from common.cli.cluster_args import wants_cluster

    batch = run.batch
    outcomes = _Outcomes(say, [f"{r['error']}" for r in batch.refused])
    for ref in batch.refused:
        say(f"FAILED {ref['error']}", always=True)
    for item in batch.ignored:
        say(f"ignored {item['file']}: {item['reason']}")
    if wants_cluster(args):
        code = _segment_on_cluster(args, run, say, outcomes)
        if code is not None:
            return code
    else:
        _segment_here(args, run, outcomes)
    failed = outcomes.failed
    if args.report is not None and not failed:
        from common.cli.scan_outputs import write_report

        write_report(args.report, args.input, args.output, run.opts, run.roi, time.perf_counter() - run.started)
    n_ok = len(batch.scans) - (len(failed) - len(batch.refused))
    say(f"{n_ok} scan(s) segmented, {len(failed)} failed; weights: {run.spec.provenance()['weights']}; output: "
        f"{args.output}")
    return 1 if failed else 0


Say = Callable[..., None]  # say(msg, *, always=False, verbose=False), see _printer


def _printer(args: argparse.Namespace) -> Say:
    """``say(msg, *, always=False, verbose=False)`` for this run: ``always`` lines go to stderr whatever -q says;
    the others to stdout unless -q, ``verbose`` ones only with -v."""
    from tqdm import tqdm

    def say(msg: str, *, always: bool = False, verbose: bool = False) -> None:
        """One line, on its own line even while the progress bar is drawn (tqdm.write clears and redraws it)."""
        if always or (not args.quiet and (args.verbose or not verbose)):
            file = sys.stderr if always else sys.stdout
            tqdm.write(msg, file=file)
            file.flush()

    return say


class _Prepared(NamedTuple):
    """What the scans need, once the options, the inputs and the model have been checked."""

    cfg: Any  # RunConfig
    opts: Any  # common.cli.scan_outputs.ScanOptions
    batch: Any  # the resolved inputs (common.sources.inputs.resolve_inputs)
    spec: Any  # the model's ModelSpec
    label_map: dict[int, str]  # class id -> name, background excluded
    roi: list[str] | None
    onnx: Path | None
    predictor: Any  # None when the scans run on a cluster
    started: float  # perf_counter at the start of the run (for --report)


def _prepare(args: argparse.Namespace, say: Say, held: ExitStack) -> _Prepared:
    """SIGTERM made a clean exit, then the checks and set-up before the first scan: options, run configuration,
    inputs, outputs (and their lock, entered on ``held``), model, ONNX file and (in this process) the predictor.
    Raises InputError, OSError or RuntimeError with a one-line message."""
    from common.cli.cluster_args import cluster_problem, wants_cluster
    from common.cli.scan_outputs import is_dicom_source, scan_options
    from common.core.paths import DEFAULT_ONNX, OPTIMIZED_CONFIG
    from common.core.signals import exit_cleanly_on_sigterm
    from common.inference.model_cache import ensure_onnx, prepare_model
    from common.inference.precision import require_native
    from common.inference.predictor_factory import build_predictor
    from common.inference.run_config import RunConfig, load_config
    from common.sources.inputs import resolve_inputs

    started = time.perf_counter()
    exit_cleanly_on_sigterm()
    problem = cluster_problem(args)
    if problem:
        raise InputError(None, problem)
    opts = scan_options(args)
    providers = _check_device(args.device)
    cfg_path = args.config or (OPTIMIZED_CONFIG if OPTIMIZED_CONFIG.exists() else None)
    if cfg_path:
        cfg = load_config(cfg_path)
    else:  # the GPU runs through ONNX Runtime's CUDA provider
        cfg = RunConfig.fastest_exact_onnx() if args.device == "gpu" else RunConfig.fastest_exact()
    cfg.segment.resample_threads = args.nr_thr_resamp
    cfg.segment.resample_order = args.resampling_order
    cfg.ort.providers = providers
    cfg = cfg.with_precision(args.precision)
    require_native(cfg.precision)  # without native bf16: PrecisionError, one line, before anything else is said
    if cfg.approximate:
        say(f"arithmetic: approximate ({cfg.precision} network): labels can differ from the official tool's",
            always=True)
    batch = resolve_inputs(args.input, None, log=lambda m: say(m), output_dirs=(args.output,))
    if opts.output_type != "nifti" and not is_folder_mode(args, batch) and batch.scans and \
            not is_dicom_source(batch.scans[0]):
        raise InputError(batch.scans[0], f"-ot {opts.output_type} needs a DICOM series as input (a folder or a zip "
                                         "of one), as the official tool")
    if args.report is not None and is_folder_mode(args, batch):
        raise InputError(None, "-rp/--report: one scan per run (the official report describes one input)")
    if args.save_probabilities is not None and is_folder_mode(args, batch):
        raise InputError(None, "-sp/--save_probabilities: one scan per run (the official tool writes one file)")
    _check_and_lock_output(args, opts, batch, held)
    spec = prepare_model(args.weights, log=lambda m: say(m))
    label_map = {k: v for k, v in spec.labels.items() if k != 0}  # class id -> name, background excluded
    roi = _roi_subset(args.roi_subset, label_map)
    if cfg.backend != "onnxruntime" and args.device == "gpu":
        raise RuntimeError("--device gpu needs the onnxruntime backend; the run configuration uses "
                           f"{cfg.backend}")
    onnx = ensure_onnx(spec, args.onnx or DEFAULT_ONNX, log=lambda m: say(m)) if cfg.backend == "onnxruntime" \
        else None
    predictor = None if wants_cluster(args) else build_predictor(cfg, spec, onnx)
    return _Prepared(cfg, opts, batch, spec, label_map, roi, onnx, predictor, started)


def _check_and_lock_output(args: argparse.Namespace, opts, batch, held: ExitStack) -> None:
    """Refuse, before the work, an -o that cannot be written; then take its lock (common.core.locks, a file in
    ``.locks/`` beside it) for the whole run, so that a second run on the same -o stops at once, naming this one.
    One scan's -o is left as it is until its new output set is complete (common.cli.console_scan)."""
    from common.core.atomic import name_too_long
    from common.core.locks import ScanLock

    out, folder_mode = args.output, is_folder_mode(args, batch)
    if opts.output_type != "nifti" and not folder_mode and out.is_dir():
        raise InputError(out, f"with -ot {opts.output_type} and one scan, -o is the DICOM file to write (e.g. "
                              "seg.dcm), not a folder")
    if opts.output_type == "nifti" and opts.ml and not folder_mode and (
            out.is_dir() or not out.name.lower().endswith((".nii", ".nii.gz"))):
        raise InputError(out, "with --ml and one scan, -o is the label map file (ending .nii.gz)")
    if not folder_mode and not opts.single_file and out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder (without --ml, -o is the folder of the class masks)")
    problem = name_too_long(out)
    if problem:
        raise InputError(None, problem)
    check_outputs(folders=(out if folder_mode else out.parent,))
    lock = held.enter_context(ScanLock(out.parent, out.name, label=f"{PROG} -i {args.input}"))
    if not lock.acquired:
        raise InputError(out, f"is being written by another {PROG} run ({lock.holder}); wait for it to finish or "
                              "choose another -o")


class _Outcomes:
    """The run's failures, one line each (refused inputs first), and the printing of each scan's messages."""

    def __init__(self, say: Say, failed: list[str]):
        self.say, self.failed = say, failed

    def show(self, messages: list[tuple[str, str]]) -> None:
        """Print a scan's (kind, line) messages: "warning" always, "verbose" with -v."""
        for kind, line in messages:
            self.say(line, always=kind == "warning", verbose=kind == "verbose")

    def failed_scan(self, line: str) -> None:
        """Count a failed scan and print its one-line error."""
        self.failed.append(line)
        self.say(f"FAILED {line}", always=True)


def _segment_on_cluster(args: argparse.Namespace, run: _Prepared, say: Say, outcomes: _Outcomes) -> int | None:
    """Every scan as a task on the Dask cluster, messages and failures printed as tasks finish. Returns the
    exit code of a failure of the cluster itself (RuntimeError, one line), else None."""
    from common.cli.args import fail
    from common.cli.cluster_args import cluster_target
    from common.runs.cluster import ModelRecipe, open_client, run_tasks

    batch = run.batch
    recipe = ModelRecipe(run.cfg, args.weights, str(run.onnx) if run.onnx else None)
    items = [(scan, batch.ids[scan], (targets_for(args, batch, scan, run.opts), run.opts, run.label_map, run.roi))
             for scan in batch.scans]
    try:
        with open_client(cluster_target(args), recipe, log=lambda m: say(m)) as client:
            for task in run_tasks(client, segment_or_error, items, scan_timeout_s=args.scan_timeout, desc=PROG,
                                  quiet=args.quiet):
                if task.error is not None:
                    outcomes.failed_scan(task.error)
                elif isinstance(task.value, str):
                    outcomes.failed_scan(task.value)
                else:
                    outcomes.show(task.value)
                if len(task.attempts) > 1:
                    say(f"note: {task.scan_id} was retried: its Dask worker died while segmenting it "
                        f"(workers: {', '.join(task.attempts)})", always=True)
    except RuntimeError as exc:
        return fail(exc)
    return None


def _segment_here(args: argparse.Namespace, run: _Prepared, outcomes: _Outcomes) -> None:
    """Every scan in this process, one after the other, under a progress bar (two scans or more, without -q)."""
    from tqdm import tqdm

    batch = run.batch
    scans = tqdm(batch.scans, desc=PROG, unit="scan", disable=args.quiet or len(batch.scans) < 2)
    for scan in scans:
        targets = targets_for(args, batch, scan, run.opts)
        out = segment_or_error(scan, batch.ids[scan], targets, run.opts, run.label_map, run.roi, run.spec,
                               run.predictor, run.cfg)
        if isinstance(out, str):
            outcomes.failed_scan(out)
        else:
            outcomes.show(out)


def console_main() -> int:
    """The installed ``totalseg-fast`` command."""
    return run_script(main)


if __name__ == "__main__":
    sys.exit(console_main())
