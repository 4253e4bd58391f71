"""The flags of ``TotalSegmentator`` 2.18 (totalsegmentator/bin/TotalSegmentator.py) that totalseg-fast does not
run as options of its own: each is registered under its official short and long spellings, so that argparse
matches it as given (a registered option wins over splitting a cluster: ``-fs`` is never read as ``-f -s``), and
is then either accepted, with what the official tool does for the fast ``total`` task, or refused in one line
(exit 2) that says why and what to do instead.

Read from the official source: for ``--fast`` the statistics are computed in nnunet.py without the extra
metrics (``-sx`` changes nothing there), derived masks exist only for the ``body`` task (``-ndm``), and the crop
path is read only by tasks that crop (``-cp``).
"""
from __future__ import annotations

import argparse
from typing import Any, NamedTuple


class Flag(NamedTuple):
    """One official option: its spellings, argparse keywords, and the refusal (None: accepted as said in help)."""

    names: tuple[str, ...]
    kwargs: dict[str, Any]
    refusal: str | None



def _order(text: str) -> int:
    """The official -ro type: a spline order 0-5."""
    value = int(text)
    if not 0 <= value <= 5:
        raise argparse.ArgumentTypeError(f"{value} is not a spline order (0-5)")
    return value


FLAGS: dict[str, Flag] = {
    "force_split": Flag(("-fs", "--force_split"), {"action": "store_true", "help": (
        "accepted: the official tool splits a large image into 3 parts to save memory; here memory is bounded by "
        "the tiles already (a whole body takes < 4 GiB), so the result is the same without it")}, None),
    "no_derived_masks": Flag(("-ndm", "--no_derived_masks"), {"action": "store_true", "help": (
        "accepted: derived masks (skin from body) exist only for the official 'body' task; the total task "
        "writes none either way")}, None),
    "statistics_extra": Flag(("-sx", "--statistics_extra"), {"action": "store_true", "help": (
        "accepted: with --fast the official tool computes statistics on the 3 mm image without the extra "
        "metrics, so statistics.json is the same with or without it (as here)")}, None),
    "crop_path": Flag(("-cp", "--crop_path"), {"metavar": "PATH", "help": (
        "accepted: read only by official tasks that crop to masks; the total task does not")}, None),
    "debug": Flag(("--debug",), {"action": "store_true", "help": (
        "accepted: errors here are always one line naming the file; -v prints stage timings")}, None),
    "fastest": Flag(("-ff", "--fastest"), {"action": "store_true", "help": "refused (the 6 mm model)"},
                    "the 6 mm model (Task 298) is not what this tool runs; it runs the 3 mm fast model (omit -ff)"),
    "model_size": Flag(("-ms", "--model_size"), {"choices": ["big", "small"], "default": "big",
                                                 "help": "only 'big' (the official 'small' is for total_v3)"},
                       "'small' is for the official task total_v3 only; the fast total model has one size"),
    "roi_subset_robust": Flag(("-rsr", "--roi_subset_robust"), {"nargs": "+", "metavar": "NAME",
                                                               "help": "refused: use --roi_subset"},
                              "this tool segments everything and writes the subset, so no crop model is run and "
                              "there is no 'robust' variant: use --roi_subset with the same names"),
    "robust_crop": Flag(("-rc", "--robust_crop"), {"action": "store_true", "help": "refused (no crop model)"},
                        "this tool runs no crop model (it segments everything, then subsets): omit -rc"),
    "body_seg": Flag(("-bs", "--body_seg"), {"action": "store_true", "help": "refused (no body crop model)"},
                     "the rough body crop (Task 300) is not run here; the official tool itself notes it helps little "
                     "with --fast: omit -bs"),
    "higher_order_resampling": Flag(("-ho", "--higher_order_resampling", "--high_order_resampling"),
                                    {"action": "store_true", "help": "refused (not implemented)"},
                                    "cropped-logits resampling is not implemented here; without -ho the result is "
                                    "the official default arithmetic"),
    "higher_order_resampling_LEGACY": Flag(("--higher_order_resampling_LEGACY", "--high_order_resampling_LEGACY"),
                                           {"action": "store_true", "help": "refused (not implemented)"},
                                           "higher-order upsampling of the masks is not implemented here; without "
                                           "it the masks are the official default (nearest neighbour)"),
    "nora_tag": Flag(("-t", "--nora_tag"), {"default": "None", "metavar": "TAG",
                                            "help": "refused (calls the local NORA platform)"},
                     "tagging in NORA runs /opt/nora on the official tool's server; not available here"),
    "license_number": Flag(("-l", "--license_number"), {"metavar": "NUMBER",
                                                        "help": "refused (the total task needs no licence)"},
                           "the total task needs no licence, and this tool never writes TotalSegmentator's "
                           "config.json; set a licence with the official tool for its licensed tasks"),
    "test": Flag(("--test",), {"type": int, "choices": [0, 1, 3], "default": 0, "metavar": "0|1|3",
                               "help": "only 0 (the official testing hook copies its reference files)"},
                 "the official --test hook copies reference segmentations from its own tests folder instead of "
                 "predicting; run without --test"),
    "save_lowres": Flag(("-sl", "--save_lowres"), {"action": "store_true", "help": (
        "supported: the result at the model's 3 mm instead of the input's resolution, written as the official "
        "tool writes it (not with --roi_subset or DICOM output, as there)")}, None),
    "resampling_order": Flag(("-ro", "--resampling_order"), {"type": _order, "default": 1, "metavar": "0-5",
                                                             "help": (
        "supported: spline order of the input's resampling to 3 mm (0-5, default 1), as the official tool")},
                             None),
    "v1_order": Flag(("-v1o", "--v1_order"), {"action": "store_true", "help": (
        "supported with --ml: classes numbered as in TotalSegmentator v1 (v2-only classes removed)")}, None),
    "remove_small_blobs": Flag(("-rmb", "--remove_small_blobs"), {"nargs": "?", "const": 200.0, "default": False,
                                                                 "type": float, "metavar": "mm3", "help": (
        "supported: remove connected components under mm3 (default 200) from every class, on the 3 mm result, "
        "by the official tool's own function")}, None),
    "radiomics": Flag(("-r", "--radiomics"), {"action": "store_true", "help": "refused (pyradiomics)"},
                      "pyradiomics does not install on this Python from PyPI (no wheel; its source build fails), so "
                      "radiomics are not computed here; run the official totalseg_get_radiomics on our masks"),
    "save_probabilities": Flag(("-sp", "--save_probabilities"), {"metavar": "PATH", "help": (
        "supported for one scan: the class probabilities as nnU-Net exports them (npz at PATH, properties in "
        "PATH.pkl); the labels are then the argmax of the probabilities, as there; needs the full logits in "
        "memory (118 x 4 bytes per 3 mm voxel)")}, None),
    "report": Flag(("-rp", "--report"), {"metavar": "PATH", "help": (
        "supported for one scan: the official run report JSON (its own build_run_report), written once the "
        "outputs are in place")}, None),
    "output_type": Flag(("-ot", "--output_type"), {"nargs": "+", "default": None, "metavar": "TYPE", "help": (
        "supported: nifti (default), dicom_seg (DICOM SEG, highdicom) or dicom_rtstruct (RTSTRUCT, rt_utils), "
        "written by the official tool's own writers; DICOM output needs a DICOM series as input and -o is the "
        "file; one type per run")}, None),
}


def add_official_flags(p: argparse.ArgumentParser) -> None:
    """Register every flag of FLAGS on ``p`` under its official spellings (one group in --help)."""
    group = p.add_argument_group("other official TotalSegmentator flags (accepted or refused in one line)")
    for dest, flag in FLAGS.items():
        group.add_argument(*flag.names, dest=dest, **flag.kwargs)


def _given(dest: str, value: Any) -> bool:
    """Whether a refusable flag was given with a value that asks for what is not run."""
    kwargs = FLAGS[dest].kwargs
    return value != kwargs.get("default", False if kwargs.get("action") == "store_true" else None)


def refusal(args: argparse.Namespace) -> str | None:
    """The one-line refusal of the first official flag given that this tool does not run, else None."""
    for dest, flag in FLAGS.items():
        if flag.refusal is not None and _given(dest, getattr(args, dest, None)):
            return f"{'/'.join(flag.names)}: {flag.refusal}"
    return None
