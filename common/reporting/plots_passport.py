"""Drawing helpers for passport pictures: CT maximum-intensity projections with world-mm overlays.

The scan is reoriented to the closest canonical RAS+ grid for display, so its array axes are
(x, y, z) ~ (Right, Anterior, Superior). World points (mm, RAS+) are mapped into that display voxel
grid with the inverse affine. Views follow the radiological habit: the patient's right on the
viewer's left (axial, coronal), anterior on the left (sagittal), superior up. Figures are made with
matplotlib's object API (Figure, no pyplot: no GUI backend, no global state) and written atomically.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from common.core.atomic import atomic_path
from common.core.errors import InputError
from common.imaging.geometry import world_to_voxel
from common.imaging.validation import load_scan
from common.records.passport import Passport

HU_WINDOW = (-200.0, 1000.0)


@dataclass(frozen=True)
class View:
    """A projection: MIP along ``depth``; ``horizontal``/``vertical`` are canonical array axes (0=x, 1=y, 2=z)."""

    name: str
    depth: int
    horizontal: int
    vertical: int
    left: str  # orientation letter at the viewer's left (horizontal axis is drawn inverted)
    right: str
    top: str
    bottom: str


VIEWS = {
    "axial": View("axial", depth=2, horizontal=0, vertical=1, left="R", right="L", top="A", bottom="P"),
    "coronal": View("coronal", depth=1, horizontal=0, vertical=2, left="R", right="L", top="S", bottom="I"),
    "sagittal": View("sagittal", depth=0, horizontal=1, vertical=2, left="A", right="P", top="S", bottom="I"),
}


@dataclass
class DisplayScan:
    """A scan on its closest canonical RAS+ grid: ``data`` (x, y, z) in HU, ``affine`` voxel -> mm."""

    path: Path
    data: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along the canonical (x, y, z) array axes."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def to_display(self, points_mm: np.ndarray) -> np.ndarray:
        """(n, 3) world mm (RAS+) -> (n, 3) fractional display voxel coordinates (x, y, z)."""
        return world_to_voxel(np.atleast_2d(points_mm), self.affine)


def load_display_scan(path: str | Path) -> DisplayScan:
    """Load and check a scan (NIfTI or DICOM folder; common.imaging.validation.load_scan, any modality) and
    reorient it to the closest canonical RAS+ grid. Bad scans raise InputError (one line)."""
    path = Path(path)
    volume = load_scan(path, modality="ANY")[0]  # 3-D, voxel size, truncated data, NaN, blank...
    canonical = nib.as_closest_canonical(volume.image)
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    return DisplayScan(path, data, np.asarray(canonical.affine, dtype=np.float64))


def mip(data: np.ndarray, axis: int, window: tuple[float, float] = HU_WINDOW) -> np.ndarray:
    """Maximum-intensity projection of an (x, y, z) HU volume along ``axis``, clipped to ``window``."""
    return np.clip(data.max(axis=axis), *window)


def project(points_vox: np.ndarray, view: View) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) display voxel coordinates -> (horizontal, vertical) plot coordinates of ``view``."""
    points_vox = np.atleast_2d(points_vox)
    return points_vox[:, view.horizontal], points_vox[:, view.vertical]


def draw_mip(ax: Axes, scan: DisplayScan, view: View, window: tuple[float, float] = HU_WINDOW) -> None:
    """Show the scan's MIP for ``view`` on ``ax`` in display voxel coordinates with the true mm aspect."""
    image = mip(scan.data, view.depth, window)
    # mip() keeps the two remaining axes in increasing order; rows must be the vertical axis.
    if view.horizontal < view.vertical:
        image = image.T
    sp = scan.spacing
    ax.imshow(image, cmap="gray", origin="lower", vmin=window[0], vmax=window[1], interpolation="nearest",
              aspect=sp[view.vertical] / sp[view.horizontal])
    n_h, n_v = scan.data.shape[view.horizontal], scan.data.shape[view.vertical]
    ax.set_xlim(n_h - 0.5, -0.5)  # inverted: the left letter's side on the viewer's left
    ax.set_ylim(-0.5, n_v - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold"}
    ax.text(0.01, 0.5, view.left, transform=ax.transAxes, ha="left", va="center", **style)
    ax.text(0.99, 0.5, view.right, transform=ax.transAxes, ha="right", va="center", **style)
    ax.text(0.5, 0.99, view.top, transform=ax.transAxes, ha="center", va="top", **style)
    ax.text(0.5, 0.01, view.bottom, transform=ax.transAxes, ha="center", va="bottom", **style)
    ax.set_title(f"{view.name} MIP", fontsize=10)


def view_figure(scan: DisplayScan, views: list[View], height_in: float = 5.0, max_width_in: float = 16.0,
                extra_width_in: float = 0.0) -> tuple[Figure, list[Axes]]:
    """A figure with one panel per view in a row, all at one mm scale (panel widths = mm widths).

    The tallest panel is ``height_in`` inches unless the row would exceed ``max_width_in``;
    ``extra_width_in`` reserves room (e.g. for a legend) on top of that.
    """
    extent = np.array(scan.data.shape) * scan.spacing  # mm along canonical x, y, z
    widths = [float(extent[v.horizontal]) for v in views]
    tallest = max(float(extent[v.vertical]) for v in views)
    inch_per_mm = min(height_in / tallest, max_width_in / sum(widths))
    size = (inch_per_mm * sum(widths) + 0.3 + extra_width_in, inch_per_mm * tallest + 0.8)
    fig = Figure(figsize=size, layout="constrained")
    axes = list(fig.subplots(1, len(views), width_ratios=widths, squeeze=False)[0])
    for ax, view in zip(axes, views, strict=True):
        draw_mip(ax, scan, view)
    return fig, axes


def save_png(fig: Figure, out: str | Path, dpi: int = 120) -> Path:
    """Render ``fig`` to a PNG at ``out`` atomically (temporary file, then rename)."""
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return out


def default_out(passport_path: str | Path, suffix: str) -> Path:
    """<passport folder>/<passport stem><suffix>.png"""
    passport_path = Path(passport_path)
    return passport_path.with_name(f"{passport_path.stem}{suffix}.png")


def scan_path_for(passport: Passport, passport_path: str | Path, scan_arg: str | Path | None) -> Path:
    """The scan to draw on: ``--scan`` if given, else passport.scan["file"].

    A relative recorded path that does not exist from the current folder is tried next to the passport.
    """
    if scan_arg:
        return Path(scan_arg)
    recorded = passport.scan.get("file")
    if recorded is None or recorded == "":
        raise InputError(passport_path, "passport records no scan file; pass --scan")
    if not isinstance(recorded, str) or "\0" in recorded:
        raise InputError(passport_path, f"scan.file is not a file path ({type(recorded).__name__} "
                                        f"{reprlib.repr(recorded)}); pass --scan")
    path = Path(recorded)
    if not path.is_absolute() and not path.exists() and (Path(passport_path).parent / path).exists():
        return Path(passport_path).parent / path
    return path


def weights_caption(passport: Passport) -> str:
    """Second title line saying which weights made the labels (stand-in labels are not anatomy)."""
    weights = passport.model.get("weights")
    if weights == "standin":
        return "\nSTAND-IN weights (seeded random): structure positions are NOT anatomical"
    return f"\nweights: {weights}" if weights else ""
