"""The clinical app's pictures, as RGB arrays (no streamlit here): CT slices with labels over them, one structure
highlighted, label contours, and two scans blended or in a checkerboard.

Volumes are put in the closest canonical orientation (RAS+) first; a slice is then shown in the radiological
convention of common.reporting.preview (the patient's right on the image's left; anterior or superior up;
sagittal: anterior on the left), row 0 at the top. Pixels are stretched to the voxel spacing (mm) so that
anatomy keeps its proportions; the colours are preview.label_colours (one colour per label id everywhere).
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.reporting.preview import HU_WINDOW, label_colours

PLANES = ("axial", "coronal", "sagittal")
PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the (x, y, z) axis a plane's slider moves along
# (top, bottom, left, right) of each plane in the radiological convention
ORIENTATION = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
WINDOWS = {"soft tissue": HU_WINDOW, "abdomen": (-160.0, 240.0), "lung": (-1350.0, 150.0), "bone": (-450.0, 1050.0)}
BASELINE_RGB, FOLLOWUP_RGB = (0, 230, 0), (255, 0, 255)  # contours: green and magenta (grey where they agree)


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``data`` (x, y, z) on the grid of ``affine`` in the closest canonical orientation, and its spacing in mm."""
    data = np.asanyarray(data)
    if data.dtype.itemsize == 8 and data.dtype.kind in "iu":  # nibabel refuses 64-bit integers without a header
        data = data.astype(np.int32)
    img = nib.as_closest_canonical(nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64)))
    return np.asanyarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2-D slice ``index`` of a canonical (x, y, z) ``volume`` along ``plane``, as displayed (rows, columns)."""
    axis = PLANE_AXIS[plane]
    index = int(np.clip(index, 0, volume.shape[axis] - 1))
    return np.take(volume, index, axis=axis).T[::-1, ::-1]


def pixel_mm(spacing: tuple[float, float, float], plane: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of a displayed ``plane`` slice."""
    x, y, z = spacing
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[plane]


def grey(ct2d: np.ndarray, window: tuple[float, float] = HU_WINDOW) -> np.ndarray:
    """A CT slice (HU) as RGB uint8 through ``window`` (low, high) HU."""
    lo, hi = window
    g = (np.clip((np.asarray(ct2d, dtype=np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def boundary(labels2d: np.ndarray) -> np.ndarray:
    """Pixels of a label that touch another value (its 4-neighbour outline), boolean."""
    lab = np.asarray(labels2d)
    edge = np.zeros(lab.shape, dtype=bool)
    for axis in (0, 1):
        diff = np.diff(lab, axis=axis) != 0
        pad_lo = [(0, 0), (0, 0)]
        pad_lo[axis] = (1, 0)
        pad_hi = [(0, 0), (0, 0)]
        pad_hi[axis] = (0, 1)
        edge |= np.pad(diff, pad_lo) | np.pad(diff, pad_hi)
    return edge & (lab > 0)


def overlay(ct_rgb: np.ndarray, labels2d: np.ndarray, alpha: float = 0.45, highlight: int | None = None) -> np.ndarray:
    """Labels in their colours over a grey CT slice (RGB uint8). ``highlight``: that label keeps ``alpha`` and gets
    a white outline, the others fade to a quarter of it."""
    rgba = label_colours(np.asarray(labels2d), alpha)
    if highlight is not None:
        rgba[..., 3] = np.where(labels2d == highlight, alpha, rgba[..., 3] * 0.25)
    a = rgba[..., 3:4]
    out = ct_rgb.astype(np.float32) * (1 - a) + rgba[..., :3] * 255.0 * a
    if highlight is not None:
        out[boundary(np.where(labels2d == highlight, 1, 0))] = 255.0
    return out.round().astype(np.uint8)


def contours(ct_rgb: np.ndarray, baseline2d: np.ndarray, followup2d: np.ndarray) -> np.ndarray:
    """The label outlines of both scans over one grey slice: baseline green, follow-up magenta, white where equal."""
    out = ct_rgb.copy()
    b, f = boundary(baseline2d), boundary(followup2d)
    out[b] = BASELINE_RGB
    out[f] = FOLLOWUP_RGB
    out[b & f & (baseline2d == followup2d)] = (255, 255, 255)
    return out


def blend(a_rgb: np.ndarray, b_rgb: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) a + weight b, RGB uint8."""
    return (a_rgb.astype(np.float32) * (1 - weight) + b_rgb.astype(np.float32) * weight).round().astype(np.uint8)


def checkerboard(a_rgb: np.ndarray, b_rgb: np.ndarray, square_px: int) -> np.ndarray:
    """Squares of ``square_px`` pixels taken alternately from a and b (same shape, RGB uint8)."""
    rows, cols = np.indices(a_rgb.shape[:2]) // max(int(square_px), 1)
    return np.where(((rows + cols) % 2 == 0)[..., None], a_rgb, b_rgb)


def to_display(rgb: np.ndarray, pixel: tuple[float, float], height_px: int, plane: str | None = None) -> np.ndarray:
    """``rgb`` stretched to its pixel size in mm (nearest neighbour) and scaled to ``height_px`` rows, with the
    orientation letters of ``plane`` at its edges."""
    from PIL import Image, ImageDraw

    rows_mm, cols_mm = rgb.shape[0] * pixel[0], rgb.shape[1] * pixel[1]
    scale = height_px / max(rows_mm, 1e-6)
    size = (max(int(round(cols_mm * scale)), 1), max(int(round(rows_mm * scale)), 1))
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).resize(size, Image.NEAREST)
    if plane is not None:
        top, bottom, left, right = ORIENTATION[plane]
        draw = ImageDraw.Draw(img)
        w, h = img.size
        font_px = max(12, h // 22)
        try:
            from PIL import ImageFont

            font = ImageFont.load_default(size=font_px)
        except (TypeError, OSError):  # older Pillow: the fixed bitmap font
            font = None
        for text, xy in ((top, (w // 2, 4)), (bottom, (w // 2, h - font_px - 6)), (left, (4, h // 2 - font_px // 2)),
                         (right, (w - font_px - 2, h // 2 - font_px // 2))):
            draw.text(xy, text, fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(img)


def legend(labels2d: list[np.ndarray], names: dict[int, str]) -> list[tuple[str, str]]:
    """(name, "#rrggbb") of every label shown in the given slices, in label order: the overlay's colours."""
    present = sorted({int(v) for lab in labels2d for v in np.unique(lab) if v != 0})
    rgb = label_colours(np.array(present, dtype=np.int64), 1.0)[..., :3] if present else np.zeros((0, 3))
    return [(names.get(k, f"label_{k}"), "#" + "".join(f"{int(round(c * 255)):02x}" for c in colour))
            for k, colour in zip(present, rgb, strict=True)]


def centre_of(labels: np.ndarray, label: int | None = None) -> tuple[int, int, int]:
    """The voxel (x, y, z) at the centre of ``label`` (of all labels when None), else of the volume."""
    mask = labels > 0 if label is None else labels == label
    if not mask.any():
        return tuple(int(s) // 2 for s in labels.shape[:3])
    return tuple(int(round(c)) for c in ndimage.center_of_mass(mask))
