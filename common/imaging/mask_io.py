"""Label maps on disk: saving one atomically, finding and loading a comparison's, and putting one on another's
voxel grid.

Label maps are nibabel arrays, (x, y, z); affines map voxel centres to RAS+ mm. Two maps are compared voxel by
voxel in world space: one is reoriented (axes permuted/flipped) onto the other's grid when their grids differ only
in axis order and direction (``align_to_grid``); grids are equal within common.imaging.labels.GRID_ATOL_MM.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import nibabel.orientations as nio
import numpy as np

from common.core.atomic import atomic_save_nifti
from common.core.errors import InputError
from common.core.text import fmt_shape
from common.imaging.labels import GRID_ATOL_MM, checked_label_array, same_grid
from common.imaging.nifti_guard import check_declared_size

GROUND_TRUTH_PATTERNS = ("{}.nii.gz", "{}_labels.nii.gz", "{}_seg.nii.gz", "{}.nii", "{}_labels.nii", "{}_seg.nii")
GRID_ANGLE_TOL_DEG = 1e-3


def find_ground_truth(gt_dir: Path, scan_id: str) -> Path | None:
    """Ground-truth label map for ``scan_id`` in ``gt_dir``: <id>.nii.gz, <id>_labels.nii.gz or <id>_seg.nii.gz."""
    for pattern in GROUND_TRUTH_PATTERNS:
        cand = gt_dir / pattern.format(scan_id)
        if cand.is_file():
            return cand
    return None


def resolve_mask(mask: str, result_path: Path) -> Path:
    """A result's mask path: absolute, or relative to the working folder, the result's folder or its parent."""
    p = Path(mask)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), result_path.parent, result_path.parent.parent):
        if (base / p).exists():
            return base / p
    return p


@dataclass(frozen=True)
class LabelMap:
    """A loaded label map: ``data`` (x, y, z) integers and ``affine`` (4x4, voxel -> RAS+ mm); or, when it could
    not be used, ``problem`` (one line naming the file) and no data."""

    data: np.ndarray | None = None
    affine: np.ndarray | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def load_label_map(path: Path) -> LabelMap:
    """Load an integer label map (x, y, z) and its affine (voxel -> RAS+ mm). InputError when unusable."""
    if not path.is_file():
        raise InputError(path, "label map not found")
    try:
        img = nib.load(str(path))  # header only: the data are read below, after the size check
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"not a readable NIfTI label map ({type(exc).__name__}: {exc})") from exc
    check_declared_size(path, img)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI label map ({type(exc).__name__}: {exc})") from exc
    return LabelMap(checked_label_array(data, path), np.asarray(img.affine, dtype=np.float64))


class MaskCache:
    """Loads each label map once (per scan: ``clear`` between scans); a load failure becomes the map's problem."""

    def __init__(self) -> None:
        self._store: dict[Path, LabelMap] = {}

    def get(self, path: Path) -> LabelMap:
        if path not in self._store:
            try:
                self._store[path] = load_label_map(path)
            except InputError as exc:
                self._store[path] = LabelMap(problem=str(exc))
        return self._store[path]

    def clear(self) -> None:
        self._store.clear()


class Alignment(NamedTuple):
    """A label map on another's grid: ``data`` (None when impossible), ``problem`` (one line, else None) and
    ``reoriented`` ("LAS -> LPS" when axes were permuted/flipped, else None)."""

    data: np.ndarray | None
    problem: str | None
    reoriented: str | None


def _grid_difference(shape_a, aff_a: np.ndarray, shape_b, aff_b: np.ndarray) -> str:
    """What differs between two voxel grids of the same axis order (one line): shape, spacing (mm), origin offset
    (mm, world distance of the centres of voxel (0, 0, 0)), direction (degrees); else the largest voxel-centre
    distance (mm)."""
    parts = []
    if tuple(shape_a) != tuple(shape_b):
        parts.append(f"shape {fmt_shape(shape_b)} vs {fmt_shape(shape_a)}")
    sp_a, sp_b = np.linalg.norm(aff_a[:3, :3], axis=0), np.linalg.norm(aff_b[:3, :3], axis=0)
    if not np.allclose(sp_a, sp_b, atol=GRID_ATOL_MM, rtol=0):
        parts.append(f"spacing {fmt_shape(sp_b, '.4g')} vs {fmt_shape(sp_a, '.4g')} mm")
    offset = float(np.linalg.norm(aff_b[:3, 3] - aff_a[:3, 3]))
    if offset > GRID_ATOL_MM:
        parts.append(f"origin {offset:.4g} mm apart")
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.sum((aff_a[:3, :3] / sp_a) * (aff_b[:3, :3] / sp_b), axis=0)
    angle = float(np.degrees(np.arccos(np.clip(np.nan_to_num(cos), -1.0, 1.0))).max())
    if angle > GRID_ANGLE_TOL_DEG:
        parts.append(f"direction {angle:.3g}° apart")
    if not parts:
        corners = np.array(np.meshgrid(*[(0, max(int(s) - 1, 0)) for s in shape_a], indexing="ij")).reshape(3, -1)
        far = np.abs((aff_b[:3, :3] - aff_a[:3, :3]) @ corners + (aff_b[:3, 3:] - aff_a[:3, 3:])).max()
        parts.append(f"voxel centres up to {far:.4g} mm apart")
    return "; ".join(parts)


def align_to_grid(ref_shape, ref_aff: np.ndarray, data: np.ndarray, aff: np.ndarray, what: str) -> Alignment:
    """``data`` (x, y, z, affine ``aff``) on the grid of the ``what``'s (``ref_shape``, ``ref_aff``) for a
    voxel-by-voxel comparison in world space: (array, None, None) when the grids are equal (common.imaging.labels.same_grid);
    (contiguous copy with axes permuted/flipped, None, "LAS -> LPS") when they are equal up to axis order and
    direction (nibabel.orientations); else (None, one-line problem naming what differs, None). The array's dtype
    is kept (no float copy)."""
    if same_grid(data.shape, aff, ref_shape, ref_aff):
        return Alignment(data, None, None)
    try:
        own, ref = nio.io_orientation(aff), nio.io_orientation(ref_aff)
        transform = nio.ornt_transform(own, ref)
    except (ValueError, np.linalg.LinAlgError):  # an axis that maps to no world axis, NaN in an affine
        return Alignment(None, f"mask grid cannot be matched to the {what}'s: singular or non-finite affine", None)
    own_codes, ref_codes = ("".join(nio.ornt2axcodes(o)) for o in (own, ref))
    view = nio.apply_orientation(data, transform)  # flips and a transpose: views, nothing copied yet
    new_aff = aff @ nio.inv_ornt_aff(transform, data.shape)
    if same_grid(view.shape, new_aff, ref_shape, ref_aff):
        return Alignment(np.ascontiguousarray(view), None, f"{own_codes} -> {ref_codes}")
    reoriented = f"; mask reoriented {own_codes} -> {ref_codes}" if own_codes != ref_codes else ""
    return Alignment(None, f"mask grid differs from the {what}'s (mask vs {what}, in the {what}'s axis order"
                           f"{reoriented}): " + _grid_difference(ref_shape, ref_aff, view.shape, new_aff), None)


def save_labels(labels: np.ndarray, affine: np.ndarray, target: str | Path,
                header: nib.Nifti1Header | None = None) -> Path:
    """Save an (x, y, z) label map as uint8 (uint16 if needed) NIfTI atomically."""
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    img = nib.Nifti1Image(np.asfortranarray(labels, dtype=dtype), affine, header)  # NIfTI order: no reordering on save
    img.set_data_dtype(dtype)
    return atomic_save_nifti(img, target)
