"""nnU-Net v2 results folder -> ModelSpec: every number the pipeline uses comes from the plans.

A results folder holds plans.json, dataset.json and fold_N/checkpoint_final.pth. Axis order:
nnU-Net's plans list spacing and patch size in its own (transposed) axis order; for a NIfTI read by
nnU-Net's SimpleITK reader the untransposed order is (z, y, x), i.e. the reverse of nibabel's (x, y, z).
ModelSpec exposes both, named explicitly.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from common.core.errors import InputError

CHECKPOINT_NAME = "checkpoint_final.pth"
STANDIN_MARKER = "STANDIN_WEIGHTS.json"


@dataclass(frozen=True)
class Normalization:
    """nnU-Net CTNormalization parameters (HU): clip to [lower, upper], then (x - mean) / std."""

    scheme: str
    mean: float
    std: float
    lower: float
    upper: float


@dataclass
class ModelSpec:
    """What the pipeline needs from an nnU-Net v2 results folder (lazy network, numbers from the plans)."""

    folder: Path
    fold: int | str
    configuration: str
    plans: dict[str, Any] = field(repr=False)
    dataset: dict[str, Any] = field(repr=False)

    # ---- plans-derived numbers -------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        cfgs = self.plans["configurations"]
        cfg = dict(cfgs[self.configuration])
        while "inherits_from" in cfg:  # nnU-Net's configuration inheritance
            parent = dict(cfgs[cfg.pop("inherits_from")])
            parent.update(cfg)
            cfg = parent
        return cfg

    @property
    def transpose_forward(self) -> tuple[int, ...]:
        return tuple(self.plans.get("transpose_forward", [0, 1, 2]))

    @property
    def transpose_backward(self) -> tuple[int, ...]:
        return tuple(self.plans.get("transpose_backward", [0, 1, 2]))

    @property
    def spacing_nnunet(self) -> tuple[float, ...]:
        """Target spacing (mm) in nnU-Net's transposed axis order, as written in plans.json."""
        return tuple(float(s) for s in self.config["spacing"])

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        """Target spacing (mm) along nibabel's (x, y, z) axes."""
        zyx = [self.spacing_nnunet[i] for i in self.transpose_backward]
        return (zyx[2], zyx[1], zyx[0])

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Patch size in nnU-Net's transposed axis order (the network's input spatial axes)."""
        return tuple(int(p) for p in self.config["patch_size"])

    @property
    def normalization(self) -> Normalization:
        schemes = self.config["normalization_schemes"]
        if len(schemes) != 1:
            raise InputError(self.folder / "plans.json", f"{len(schemes)} input channels; this pipeline handles 1 (CT)")
        props = self.plans["foreground_intensity_properties_per_channel"]["0"]
        return Normalization(scheme=schemes[0], mean=float(props["mean"]), std=float(props["std"]),
                             lower=float(props["percentile_00_5"]), upper=float(props["percentile_99_5"]))

    @property
    def labels(self) -> dict[int, str]:
        """Label id -> name, background (0) included, from dataset.json."""
        out = {}
        for name, value in self.dataset["labels"].items():
            if isinstance(value, (list, tuple)):
                raise InputError(self.folder / "dataset.json", "region-based labels are not supported")
            out[int(value)] = name
        return dict(sorted(out.items()))

    @property
    def num_classes(self) -> int:
        """Number of network output channels (background included)."""
        return len(self.labels)

    @property
    def architecture(self) -> dict[str, Any]:
        """nnU-Net 'architecture' dict (new plans format); old-format plans are converted by nnU-Net itself."""
        cfg = self.config
        if "architecture" in cfg:
            return cfg["architecture"]
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans).get_configuration(self.configuration).configuration["architecture"]

    # ---- weights ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.folder / f"fold_{self.fold}" / CHECKPOINT_NAME

    @property
    def is_standin(self) -> bool:
        return (self.folder / STANDIN_MARKER).exists()

    @cached_property
    def checkpoint_sha256(self) -> str:
        return sha256_file(self.checkpoint_path)

    def provenance(self) -> dict[str, Any]:
        """What every downstream output records about the weights."""
        info: dict[str, Any] = {
            "name": self.folder.parent.name,
            "trainer_plans_config": self.folder.name,
            "fold": self.fold,
            "weights": "standin" if self.is_standin else "official",
            "sha256": self.checkpoint_sha256,
            "folder": str(self.folder),
        }
        if self.is_standin:
            info["standin"] = json.loads((self.folder / STANDIN_MARKER).read_text(encoding="utf-8"))
        return info

    def build_network(self):
        """The PyTorch network with the checkpoint's weights, in eval mode (imports torch lazily)."""
        import torch
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        arch = self.architecture
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     input_channels=1, output_channels=self.num_classes, allow_init=False,
                                     deep_supervision=False)
        ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ckpt["network_weights"])
        return net.eval()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_model_spec(folder: str | Path, fold: int | str = 0, configuration: str | None = None) -> ModelSpec:
    """Read an nnU-Net v2 results folder (the trainer__plans__configuration folder)."""
    folder = Path(folder)
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).exists():
            raise InputError(folder, f"not an nnU-Net v2 results folder ({name} missing)")
    try:
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
        dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(folder, f"unreadable plans/dataset JSON ({exc})") from exc
    if configuration is None:
        configuration = folder.name.split("__")[-1] if "__" in folder.name else "3d_fullres"
    if configuration not in plans.get("configurations", {}):
        raise InputError(folder / "plans.json", f"configuration {configuration!r} not in plans")
    spec = ModelSpec(folder=folder, fold=fold, configuration=configuration, plans=plans, dataset=dataset)
    if not spec.checkpoint_path.exists():
        raise InputError(spec.checkpoint_path, "checkpoint missing")
    return spec
