"""nnU-Net v2 results folder -> ModelSpec: every number the pipeline uses comes from the plans.

A results folder holds plans.json, dataset.json and fold_N/checkpoint_final.pth. A checkpoint that cannot be
used (truncated, corrupt, or the weights of another network) is an InputError naming the file and the fix:
``load_model_spec`` checks the zip and its CRCs (before any work), ``ModelSpec.build_network`` the rest.
Axis order:
nnU-Net's plans list spacing and patch size in its own (transposed) axis order; for a NIfTI read by
nnU-Net's SimpleITK reader the untransposed order is (z, y, x), i.e. the reverse of nibabel's (x, y, z).
ModelSpec exposes both, named explicitly.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from common.core.errors import InputError

CHECKPOINT_NAME = "checkpoint_final.pth"
STANDIN_MARKER = "STANDIN_WEIGHTS.json"
# How to get the official Task 297 weights again (TotalSegmentator's downloader skips a Dataset folder that exists)
REDOWNLOAD = ("download the weights again (TotalSegmentator's `totalseg_download_weights -t total_fast`, or this "
              "suite with --weights official), or use --weights standin")


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

    def weights_fix(self) -> str:
        """What to do about an unusable checkpoint: delete the folder the downloader (or the stand-in builder)
        looks for, and get the weights again."""
        if self.is_standin:
            return f"delete the folder {self.folder} and run again (the stand-in weights are rebuilt)"
        top = self.folder.parent if self.folder.parent.name.startswith("Dataset") else self.folder
        return f"delete the folder {top} and {REDOWNLOAD}"

    def check_checkpoint_file(self) -> None:
        """Refuse an empty checkpoint, or a zip (torch's format since 1.6) that is truncated (its directory, at the
        end, missing) or has a record failing its CRC-32, with InputError naming the file and the fix.

        torch.load reports the first as an "internal miniz error" and does not notice the second at all (it
        reads stored records without checking their CRC), so damaged weights would run, and be exported to
        ONNX, unnoticed. Reading the file once costs ~0.1 s per 66 MB (the sha256 reads it again)."""
        path = self.checkpoint_path
        size = path.stat().st_size
        if size == 0:
            raise InputError(path, f"the weights file is empty (0 bytes); {self.weights_fix()}")
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        if not is_zip:  # older torch wrote plain pickles: those are left to torch.load
            return
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except Exception as exc:  # BadZipFile, OSError, EOFError, zlib.error...: the zip cannot be read
            raise InputError(path, f"the weights file is truncated or corrupt ({size / 2**20:.1f} MiB; the zip "
                                   "directory at its end is missing: an interrupted download or copy?); "
                                   f"{self.weights_fix()}") from exc
        if bad is not None:
            raise InputError(path, f"the weights file is corrupt (its record {bad} fails the CRC check); "
                                   f"{self.weights_fix()}")

    def build_network(self):
        """The PyTorch network with the checkpoint's weights, in eval mode (imports torch lazily).

        A checkpoint torch cannot read, one without nnU-Net's "network_weights", or the weights of another network
        than plans.json describes (missing/unexpected/differently shaped tensors) is an InputError naming the
        file and the fix (``weights_fix``), never torch's multi-line message."""
        import torch
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        arch = self.architecture
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     input_channels=1, output_channels=self.num_classes, allow_init=False,
                                     deep_supervision=False)
        path = self.checkpoint_path
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # RuntimeError (miniz), EOFError, UnpicklingError, ... all mean: unreadable
            reason = str(exc).split(". ")[0].strip() or type(exc).__name__
            raise InputError(path, f"the weights file is truncated or corrupt (torch: {reason}); "
                                   f"{self.weights_fix()}") from exc
        weights = ckpt.get("network_weights") if isinstance(ckpt, dict) else None
        if not isinstance(weights, dict):
            raise InputError(path, f"not an nnU-Net checkpoint (no 'network_weights' in it); {self.weights_fix()}")
        mismatch = state_dict_mismatch(net.state_dict(), weights)
        if mismatch:
            raise InputError(path, f"holds the weights of another network than {self.folder / 'plans.json'} "
                                   f"describes ({mismatch}); {self.weights_fix()}")
        net.load_state_dict(weights)
        return net.eval()


def state_dict_mismatch(expected: dict[str, Any], got: dict[str, Any]) -> str | None:
    """None when ``got`` has exactly the tensors of ``expected`` (same names and shapes), else one line saying
    how many are missing, unexpected or of another shape, with the first example."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    other = [k for k in expected if k in got and _shape(expected[k]) != _shape(got[k])]
    if not (missing or unexpected or other):
        return None
    parts = [f"{len(v)} {what}" for v, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                (other, "of another shape")) if v]
    if other:
        k = other[0]
        example = f"{k}: {_shape(got[k])} in the file, {_shape(expected[k])} in the network"
    else:
        example = f"{(missing or unexpected)[0]} {'missing' if missing else 'unexpected'}"
    return f"{', '.join(parts)} of {len(expected)} tensors; e.g. {example}"


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in getattr(value, "shape", ()))


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
    spec.check_checkpoint_file()
    return spec
