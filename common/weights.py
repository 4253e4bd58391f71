"""Where TotalSegmentator keeps its Task 297 weights; obtaining them; the seeded stand-in.

The stand-in is a complete nnU-Net v2 results folder with the exact Task 297 ("total", fast, 3 mm)
architecture and seeded random weights, written where the official tool looks, so that the official
TotalSegmentator and this project's pipeline run on the same network. Timings on it are real; anatomy is not.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json
from common.model import CHECKPOINT_NAME, STANDIN_MARKER

TASK_ID = 297
DATASET_NAME = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
DOWNLOAD_HOST = ("github.com", 443)  # TotalSegmentator's weight releases

# The Task 297 plans, as published with TotalSegmentator v2 (spacing/patch/intensity properties). These
# numbers live only here, in the stand-in builder; everything downstream reads them back from plans.json.
TASK297_PLANS_3D_FULLRES: dict[str, Any] = {
    "data_identifier": "nnUNetPlans_3d_fullres",
    "preprocessor_name": "DefaultPreprocessor",
    "batch_size": 2,
    "patch_size": [112, 112, 128],
    "median_image_size_in_voxels": [165.0, 113.0, 113.0],
    "spacing": [3.0, 3.0, 3.0],
    "normalization_schemes": ["CTNormalization"],
    "use_mask_for_norm": [False],
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
    "batch_dice": False,
    "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 5,
            "features_per_stage": [32, 64, 128, 256, 320],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 5,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [2, 2, 2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2, 2, 2],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    },
}
TASK297_INTENSITY = {"0": {"max": 3071.0, "mean": -50.3869, "median": 31.0, "min": -1024.0,
                           "percentile_00_5": -1004.0, "percentile_99_5": 1588.0, "std": 503.3923}}


def totalseg_home() -> Path:
    """$TOTALSEG_HOME_DIR, else ~/.totalsegmentator (TotalSegmentator's own rule, config.get_totalseg_dir)."""
    from totalsegmentator.config import get_totalseg_dir

    return Path(get_totalseg_dir())


def task297_folder() -> Path:
    """The results folder the official tool reads for `fast=True, task='total'`."""
    from totalsegmentator.config import get_weights_dir

    return Path(get_weights_dir()) / DATASET_NAME / f"{TRAINER}__{PLANS_NAME}__{CONFIGURATION}"


def configure_offline_totalseg() -> Path:
    """Write TotalSegmentator's config.json with usage statistics off (no network call after a run)."""
    home = totalseg_home()
    home.mkdir(parents=True, exist_ok=True)
    cfg_file = home / "config.json"
    cfg: dict[str, Any] = {}
    if cfg_file.exists():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cfg = {}
    cfg.setdefault("totalseg_id", "totalseg_benchmark")
    cfg.setdefault("prediction_counter", 0)
    cfg["send_usage_stats"] = False
    cfg["statistics_disclaimer_shown"] = True
    atomic_write_json(cfg_file, cfg, indent=4)
    return cfg_file


def _class_names() -> dict[int, str]:
    from totalsegmentator.map_to_binary import class_map

    return dict(sorted(class_map["total"].items()))


def build_standin(folder: Path | None = None, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the stand-in Task 297 results folder; never touches a folder that holds official weights.

    Returns the folder. Raises FileExistsError if real weights are there, unless they are a stand-in and
    ``overwrite`` is set.
    """
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.network_initialization import InitWeights_He

    folder = Path(folder) if folder is not None else task297_folder()
    ckpt = folder / "fold_0" / CHECKPOINT_NAME
    if ckpt.exists():
        if not (folder / STANDIN_MARKER).exists():
            raise FileExistsError(f"{folder}: official weights present; refusing to overwrite them")
        if not overwrite:
            return folder
    names = _class_names()
    labels = {"background": 0, **{name: idx for idx, name in names.items()}}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1559, "file_ending": ".nii.gz",
               "name": DATASET_NAME}
    plans = {"dataset_name": DATASET_NAME, "plans_name": PLANS_NAME,
             "original_median_spacing_after_transp": [3.0, 3.0, 3.0],
             "original_median_shape_after_transp": [165, 113, 113],
             "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {CONFIGURATION: TASK297_PLANS_3D_FULLRES},
             "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": TASK297_INTENSITY}
    arch = TASK297_PLANS_3D_FULLRES["architecture"]
    torch.manual_seed(seed)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 input_channels=1, output_channels=len(labels), allow_init=True,
                                 deep_supervision=False)
    net.apply(InitWeights_He(1e-2))  # nnU-Net's own initialisation
    n_params = sum(p.numel() for p in net.parameters())
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "plans.json", plans)
    atomic_write_json(folder / "dataset.json", dataset)
    checkpoint = {"network_weights": net.state_dict(), "trainer_name": TRAINER,
                  "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset},
                  "inference_allowed_mirroring_axes": None, "current_epoch": 0, "standin": True}
    tmp = ckpt.with_name(".tmp-" + ckpt.name)
    torch.save(checkpoint, tmp)
    os.replace(tmp, ckpt)
    atomic_write_json(folder / STANDIN_MARKER, {
        "what": "seeded random weights with the exact Task 297 architecture (NOT the official weights)",
        "seed": seed, "init": "nnU-Net InitWeights_He(1e-2)", "n_parameters": n_params,
        "torch": torch.__version__})
    return folder


def network_reachable(host: tuple[str, int] | None = None, timeout: float = 3.0) -> bool:
    """True if a TCP connection to ``host`` (default: the weights' host) opens within ``timeout`` s."""
    host = host or DOWNLOAD_HOST
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def try_download_official(log=print) -> bool:
    """Fetch the official Task 297 weights through TotalSegmentator's own downloader.

    Returns True on success. Offline this returns False within a few seconds with one clear line: the
    official downloader uses requests without a timeout, so reachability is checked first.
    """
    if not network_reachable():
        log(f"official Task {TASK_ID} weights: cannot reach {DOWNLOAD_HOST[0]}:{DOWNLOAD_HOST[1]} (offline?); "
            "using the seeded stand-in weights instead")
        return False
    from totalsegmentator.config import setup_nnunet
    from totalsegmentator.libs import download_pretrained_weights

    setup_nnunet()
    try:
        download_pretrained_weights(TASK_ID)
    except Exception as exc:  # network errors of many kinds; the message is what matters
        log(f"official Task {TASK_ID} weights: download failed ({type(exc).__name__}: {exc}); using stand-in")
        folder = task297_folder()
        if folder.exists() and not (folder / "fold_0" / CHECKPOINT_NAME).exists():
            shutil.rmtree(folder.parent, ignore_errors=True)  # a half-unpacked download
        return False
    return (task297_folder() / "fold_0" / CHECKPOINT_NAME).exists()


def ensure_task297(mode: str = "auto", log=print) -> Path:
    """Return the Task 297 results folder, obtaining weights as ``mode`` says.

    mode: "auto" (use what is there; else try the official download; else build the stand-in),
    "official" (error if official weights cannot be had), "standin" (build/use the stand-in; refuses
    to replace official weights).
    """
    if mode not in ("auto", "official", "standin"):
        raise ValueError(f"weights mode must be auto, official or standin, not {mode!r}")
    folder = task297_folder()
    have = (folder / "fold_0" / CHECKPOINT_NAME).exists()
    is_standin = (folder / STANDIN_MARKER).exists()
    if have and (mode == "auto" or (mode == "standin") == is_standin):
        return folder
    if mode in ("auto", "official") and not (have and not is_standin):
        if have and is_standin:  # make room for the official download; the stand-in is rebuilt on failure
            shutil.rmtree(folder)
        if try_download_official(log):
            return folder
        if mode == "official":
            raise RuntimeError(f"official Task {TASK_ID} weights unavailable (see message above); "
                               "use --weights standin or place them in " + str(folder))
    if mode == "standin" and have and not is_standin:
        raise FileExistsError(f"{folder}: official weights present; remove them yourself to use the stand-in")
    return build_standin(folder)
