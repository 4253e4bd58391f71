"""A preview PNG a person checks at a glance: the labels in colour over three orthogonal CT slices.

Drawn from the 3 mm canonical (RAS+) arrays the pipeline already has, so it costs well under a second even
for a whole-body scan (the official tool renders 3-D surfaces with fury/xvfb instead). Slices go through the
centre of the labelled voxels; radiological convention (the patient's right on the image's left).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.atomic import atomic_path

HU_WINDOW = (-400.0, 600.0)


def write_preview(ct: np.ndarray, labels: np.ndarray, target: Path, title: str = "") -> Path:
    """Save the preview of ``labels`` over ``ct`` (both (x, y, z) RAS+, isotropic voxels) as PNG at ``target``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.argwhere(labels > 0)
    centre = idx.mean(axis=0).round().astype(int) if idx.size else np.array(labels.shape) // 2
    lo, hi = HU_WINDOW
    cmap = plt.get_cmap("nipy_spectral")
    n = max(int(labels.max()), 1)
    views = [("axial", ct[:, :, centre[2]], labels[:, :, centre[2]]),
             ("coronal", ct[:, centre[1], :], labels[:, centre[1], :]),
             ("sagittal", ct[centre[0], :, :], labels[centre[0], :, :])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100)
    for ax, (name, img, lab) in zip(axes, views, strict=True):
        img, lab = img.T, lab.T  # rows = second array axis (y or z), columns = first (x or y)
        if name != "sagittal":  # RAS+: x grows toward the patient's right; radiological shows it on the left
            img, lab = img[:, ::-1], lab[:, ::-1]
        ax.imshow(np.clip((img - lo) / (hi - lo), 0, 1), cmap="gray", origin="lower", interpolation="nearest")
        overlay = cmap(lab / n)
        overlay[..., 3] = np.where(lab > 0, 0.55, 0.0)
        ax.imshow(overlay, origin="lower", interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    n_struct = len(np.unique(labels)) - (1 if (labels == 0).any() else 0)
    fig.suptitle(f"{title}  ({n_struct} structures)".strip())
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(target)
