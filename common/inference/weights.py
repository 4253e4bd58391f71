"""Where the Task 297 weights live; obtaining the official ones; the seeded stand-in.

Two places, never mixed:
- the USER's TotalSegmentator home ($TOTALSEG_HOME_DIR or ~/.totalsegmentator, TOTALSEG_WEIGHTS_PATH
  honoured): read only. The official weights there are used whenever they are installed. The one write
  is TotalSegmentator's own downloader, on request (--weights auto/official), fetching the official weights.
- the PROJECT's own TotalSegmentator home (``models/totalseg_home`` or $TS_BENCH_TOTALSEG_HOME): the
  stand-in lives here, with a config.json that has usage statistics off. Official reference runs point the
  official tool at it explicitly, inside their isolated worker only (common/runs/official_worker.py).

The stand-in is a complete nnU-Net v2 results folder with the exact Task 297 ("total", fast, 3 mm)
architecture and seeded random weights, so that the official TotalSegmentator and this project's pipeline
run on the same network. Timings on it are real; anatomy is not.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.core.atomic import atomic_path, atomic_write_json
from common.core.paths import MODELS
from common.imaging.labels import total_class_names
from common.inference.model import CHECKPOINT_NAME, STANDIN_MARKER

TASK_ID = 297
DATASET_NAME = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
PROJECT_HOME_ENV = "TS_BENCH_TOTALSEG_HOME"
DOWNLOAD_TIMEOUT_S = 1800.0   # the official downloader itself has no timeout
PROBE_TIMEOUT_S = 10.0

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
    """The user's TotalSegmentator home: $TOTALSEG_HOME_DIR, else ~/.totalsegmentator (the official rule,
    config.get_totalseg_dir). Read only for this project."""
    from totalsegmentator.config import get_totalseg_dir

    return Path(get_totalseg_dir())


def _task297_under(weights_root: Path) -> Path:
    return Path(weights_root) / DATASET_NAME / f"{TRAINER}__{PLANS_NAME}__{CONFIGURATION}"


def task297_folder() -> Path:
    """The results folder the official tool reads for `fast=True, task='total'` in the user's environment."""
    from totalsegmentator.config import get_weights_dir

    return _task297_under(Path(get_weights_dir()))


def project_totalseg_home() -> Path:
    """The project's own TotalSegmentator home: $TS_BENCH_TOTALSEG_HOME, else <project>/models/totalseg_home."""
    env = os.environ.get(PROJECT_HOME_ENV)
    return Path(env).resolve() if env else MODELS / "totalseg_home"


def standin_folder(home: Path | None = None) -> Path:
    """Where the stand-in Task 297 results folder lives: inside the project's TotalSegmentator home."""
    return _task297_under((home or project_totalseg_home()) / "nnunet" / "results")


def prepare_project_home(home: Path | None = None) -> Path:
    """Create the project's TotalSegmentator home with a config.json that has usage statistics off (the
    official tool's config writes during our reference runs land here). Returns the home folder."""
    home = Path(home) if home is not None else project_totalseg_home()
    home.mkdir(parents=True, exist_ok=True)
    cfg_file = home / "config.json"
    cfg: dict[str, Any] = {}
    if cfg_file.exists():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cfg = {}
    want = {"send_usage_stats": False, "statistics_disclaimer_shown": True}
    if not isinstance(cfg, dict) or any(cfg.get(k) != v for k, v in want.items()):
        cfg = {"totalseg_id": "totalseg_benchmark", "prediction_counter": 0,
               **(cfg if isinstance(cfg, dict) else {}), **want}
        atomic_write_json(cfg_file, cfg, indent=4)
    return home


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / "fold_0" / CHECKPOINT_NAME).exists()


def is_standin_folder(folder: Path) -> bool:
    return (Path(folder) / STANDIN_MARKER).exists()


def build_standin(folder: Path | None = None, seed: int = 0, overwrite: bool = False,
                  patch_size: tuple[int, int, int] | None = None) -> Path:
    """Write the stand-in Task 297 results folder (default: ``standin_folder()`` in the project's home);
    never touches a folder that holds official weights.

    ``patch_size`` (z, y, x voxels) replaces the published 112 x 112 x 128 in plans.json: only for tests
    that need many cheap official calls through the same code path (same network, smaller tiles).
    Returns the folder. Raises FileExistsError if real weights are there, unless they are a stand-in and
    ``overwrite`` is set.
    """
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.network_initialization import InitWeights_He

    folder = Path(folder) if folder is not None else standin_folder()
    ckpt = folder / "fold_0" / CHECKPOINT_NAME
    if ckpt.exists():
        if not (folder / STANDIN_MARKER).exists():
            raise FileExistsError(f"{folder}: official weights present; refusing to overwrite them")
        if not overwrite:
            return folder
    names = total_class_names()
    labels = {"background": 0, **{name: idx for idx, name in names.items()}}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1559, "file_ending": ".nii.gz",
               "name": DATASET_NAME}
    plans = {"dataset_name": DATASET_NAME, "plans_name": PLANS_NAME,
             "original_median_spacing_after_transp": [3.0, 3.0, 3.0],
             "original_median_shape_after_transp": [165, 113, 113],
             "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {CONFIGURATION: {**TASK297_PLANS_3D_FULLRES,
                                                **({"patch_size": list(patch_size)} if patch_size else {})}},
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
    # the marker first and the checkpoint last: a folder with a checkpoint is complete
    atomic_write_json(folder / STANDIN_MARKER, {
        "what": "seeded random weights with the exact Task 297 architecture (NOT the official weights)",
        "seed": seed, "init": "nnU-Net InitWeights_He(1e-2)", "n_parameters": n_params,
        "patch_size": plans["configurations"][CONFIGURATION]["patch_size"], "torch": torch.__version__})
    with atomic_path(ckpt) as tmp:
        torch.save(checkpoint, tmp)
    return folder


def weights_url(task_id: int = TASK_ID) -> str:
    """The URL TotalSegmentator's own downloader fetches for ``task_id`` (read from its task table)."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    info = TASK_ID_WEIGHTS_CONFIGS[task_id]
    return f"https://github.com/wasserth/TotalSegmentator/releases/download/{info['version']}/{info['foldername']}.zip"


def probe_download(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if an HTTP HEAD of the weights' URL succeeds within ``timeout`` s, else the reason (one line).

    Uses requests, which honours HTTP(S)_PROXY / NO_PROXY and the system's CA settings like the official
    downloader (also requests), so a proxy that lets the download through lets this check through too.
    """
    import requests

    url = url or weights_url()
    try:
        r = requests.head(url, timeout=timeout, allow_redirects=True)
    except requests.RequestException as exc:
        return f"cannot reach {url.split('/')[2]} ({type(exc).__name__})"
    if r.status_code >= 400:
        return f"{url} answered HTTP {r.status_code}"
    return None


_DOWNLOAD_CODE = "from totalsegmentator.libs import download_pretrained_weights as d; d({task})"


def try_download_official(log=print, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> str | None:
    """Fetch the official Task 297 weights into the user's home with TotalSegmentator's own downloader.

    Returns None on success, else the reason (one line). The downloader runs in a child process under
    ``timeout_s`` (it has no timeout of its own); a download that fails half-way leaves no partial folder.
    """
    reason = probe_download()
    if reason is not None:
        return reason
    folder = task297_folder()
    existed = folder.parent.exists()
    log(f"downloading the official Task {TASK_ID} weights with TotalSegmentator's downloader into {folder.parent}")
    try:
        proc = subprocess.run([sys.executable, "-c", _DOWNLOAD_CODE.format(task=TASK_ID)], timeout=timeout_s,
                              capture_output=True, text=True, encoding="utf-8", errors="replace")
        err = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["exit code "
                                                                                  f"{proc.returncode}"])[-1]
    except subprocess.TimeoutExpired:
        err = f"no result within {timeout_s:.0f} s"
    if err is None and has_checkpoint(folder):
        return None
    if not existed and folder.parent.exists() and not has_checkpoint(folder):
        shutil.rmtree(folder.parent, ignore_errors=True)  # a half-unpacked download of ours
    return f"download failed: {err or 'no checkpoint after unpacking'}"


def ensure_task297(mode: str = "auto", log=print) -> Path:
    """Return the Task 297 results folder to use, obtaining weights as ``mode`` says.

    mode "auto": the official weights installed in the user's home; else TotalSegmentator's own download;
    else the seeded stand-in in the project's home (one line says why). "official": the same without the
    stand-in (RuntimeError if they cannot be had). "standin": the project's stand-in (built once).
    The user's home is never written, except by the official downloader.
    """
    if mode not in ("auto", "official", "standin"):
        raise ValueError(f"weights mode must be auto, official or standin, not {mode!r}")
    if mode in ("auto", "official"):
        user = task297_folder()
        if has_checkpoint(user) and not is_standin_folder(user):
            return user
        if has_checkpoint(user):  # written there by an earlier version of this suite
            reason = (f"{user} holds stand-in weights written by an earlier version of this suite (the official "
                      "tool would use them too); delete that folder so that the official weights can be installed")
        else:
            reason = try_download_official(log)
            if reason is None:
                return user
        if mode == "official":
            raise RuntimeError(f"official Task {TASK_ID} weights unavailable: {reason}; "
                               "use --weights standin, or install them in " + str(user))
        log(f"official Task {TASK_ID} weights: {reason}; using the seeded stand-in weights ({standin_folder()})")
    return build_standin(standin_folder())
