"""A preview PNG a person checks at a glance: the labels in colour over three orthogonal CT slices.

Drawn from the 3 mm canonical (RAS+) arrays the pipeline already has, so it costs well under a second even
for a whole-body scan (the official tool renders 3-D surfaces with fury/xvfb instead). Slices go through the
centre of the labelled voxels; radiological convention (the patient's right on the image's left; see
preview_panels).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.core.atomic import atomic_path

HU_WINDOW = (-400.0, 600.0)


GOLDEN = 0.6180339887  # hue step between consecutive label ids: neighbours get far-apart hues


def label_colours(labels: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """RGBA (..., 4) for a label array: a saturated, bright colour per label id (the same id has the same colour
    in every preview; consecutive ids, often neighbouring structures, get distant hues), transparent for 0.
    A sequential colour map would give the highest id a grey and the lowest a near-black, invisible on CT."""
    from matplotlib.colors import hsv_to_rgb

    hue = (labels.astype(np.float64) * GOLDEN) % 1.0
    rgb = hsv_to_rgb(np.stack([hue, np.full_like(hue, 0.9), np.ones_like(hue)], axis=-1))
    return np.concatenate([rgb, np.where(labels > 0, alpha, 0.0)[..., None]], axis=-1)


def preview_panels(ct: np.ndarray, labels: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The three views as (name, CT 2-D, labels 2-D), each array (rows, columns) ready for
    ``imshow(origin="lower")``: row 0 at the bottom. ``ct`` and ``labels`` are (x, y, z) RAS+ with isotropic
    voxels. Slices go through the centre of the labelled voxels. Radiological display: axial and coronal show
    the patient's right on the image's left (x, which grows toward the right in RAS+, runs right to left),
    anterior up (axial) and superior up (coronal, sagittal); sagittal shows anterior on the left."""
    idx = np.argwhere(labels > 0)
    centre = idx.mean(axis=0).round().astype(int) if idx.size else np.array(labels.shape) // 2
    views = [("axial", ct[:, :, centre[2]], labels[:, :, centre[2]]),  # (x, y): rows y (anterior up)
             ("coronal", ct[:, centre[1], :], labels[:, centre[1], :]),  # (x, z): rows z (superior up)
             ("sagittal", ct[centre[0], :, :], labels[centre[0], :, :])]  # (y, z): rows z, columns y
    # transposed: rows = the second array axis, columns = the first, reversed (x: right to left; y: anterior left)
    return [(name, img.T[:, ::-1], lab.T[:, ::-1]) for name, img, lab in views]


def write_preview(ct: np.ndarray, labels: np.ndarray, target: Path, title: str = "") -> Path:
    """Save the preview of ``labels`` over ``ct`` (both (x, y, z) RAS+, isotropic voxels) as PNG at ``target``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = HU_WINDOW
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100)
    for ax, (name, img, lab) in zip(axes, preview_panels(ct, labels), strict=True):
        ax.imshow(np.clip((img - lo) / (hi - lo), 0, 1), cmap="gray", origin="lower", interpolation="nearest")
        ax.imshow(label_colours(lab), origin="lower", interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    n_struct = len(np.unique(labels)) - (1 if (labels == 0).any() else 0)
    fig.suptitle(f"{title}  ({n_struct} structures)".strip())
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(target)
