"""Header facts that do not stop a run but change what the output means: no orientation, a sheared affine.

Each check returns one warning line that starts with the path, or None; ``common.imaging.validation``
calls them for every loaded scan (after ``check_spacing`` has refused zero/NaN voxel sizes and singular
affines). Arrays are nibabel-ordered (x, y, z); affines map voxel indices to world mm (RAS+).

No orientation (``sform_code = qform_code = 0``). nibabel then gives the image its "base" affine (Analyze's
convention): voxel sizes on the diagonal, x negated, the centre voxel at the origin, i.e. axes L, A, S. The
official TotalSegmentator loads scans with nibabel (``nib.load(...).affine``), so it segments on that guess
too; the NIfTI standard's own fallback ("method 1": niftilib, ITK, hence 3D Slicer / ITK-SNAP) has no flip
(R, A, S), so readers disagree on left and right. The warning says which axes were assumed. nibabel itself
says nothing about it (no log line, no Python warning), so the warning is not printed twice.

Sheared affine (voxel axes not perpendicular, e.g. a gantry-tilted CT converted without tilt correction).
A warning, not a refusal, because that is what the official tool's grid handling makes correct:
TotalSegmentator 2.x (nnunet.nnUNet_predict_image) copies the scan as ``Nifti1Image(get_fdata(), affine)``
(nibabel sets that header's zooms to the affine's column lengths; the shear is only dropped from the qform),
applies ``nib.as_closest_canonical`` (an axis permutation/flip, the shear kept), and ``resampling.change_spacing``
zooms the array along its own voxel axes by header zooms / 3 mm (its docstring: "Only works properly if affine
is all 0 except for diagonal and offset (=no rotation and sheering)"). The network therefore sees the voxel
array as if its axes were perpendicular, i.e. the anatomy skewed by the shear angle; the label map is resampled
back to the input's shape (``force_affine``), un-canonicalised, and saved with the input's own affine. So the
mask lines up with the scan voxel for voxel and, through that affine, in world space; only the accuracy of the
segmentation suffers, by an amount that grows with the angle. This project's pipeline does the same
(``common.inference.preprocess.to_canonical`` / ``resample_to_spacing``, ``common.inference.postprocess``), so
refusing would reject files the official tool segments, and silence would hide the skew. The DICOM path
refuses a gantry tilt (``common.imaging.dicom_checks``) because the official converter (dicom2nifti) does.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import nibabel as nib
import numpy as np

from common.core.text import fmt_vec

# Below this, a deviation from 90 degrees is float rounding of a stored sform (float32: ~1e-5 degrees),
# not a shear: 0.01 degrees moves a voxel by < 0.1 mm across a 500 mm scan.
SHEAR_TOL_DEG = 0.01
AXES = "xyz"
_DIRECTIONS = {"L": "left", "R": "right", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}


def has_no_orientation(img: nib.Nifti1Image) -> bool:
    """True for a NIfTI header whose sform_code and qform_code are both 0 (no orientation stored)."""
    hdr = img.header
    if not isinstance(hdr, nib.Nifti1Header):  # Nifti2Header is a subclass; Analyze has no codes
        return False
    return int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0


def orientation_warning(path: str | Path | None, img: nib.Nifti1Image) -> str | None:
    """One-line warning for a NIfTI with ``sform_code = qform_code = 0``, naming the axes that were assumed."""
    if not has_no_orientation(img):
        return None
    affine = np.asarray(img.affine, dtype=np.float64)
    codes = nib.orientations.aff2axcodes(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    axes = ", ".join(f"{a} to the {_DIRECTIONS.get(c, c)}" if c in "LR" else f"{a} {_DIRECTIONS.get(c, c)}"
                     for a, c in zip(AXES, codes, strict=True))
    return (f"{path}: orientation unknown (sform_code and qform_code are 0): assumed nibabel's fallback, as the "
            f"official TotalSegmentator does: voxel sizes {fmt_vec(zooms)} mm on the diagonal, x negated, axes "
            f"{''.join(codes)} ({axes}); other readers (the NIfTI standard, ITK) assume RAS, so left and right in "
            "the output are a guess; store the scan's real orientation (sform/qform) in the file")


def largest_shear_deg(affine: np.ndarray) -> tuple[float, str, float]:
    """The largest deviation from 90 degrees between two voxel axes of ``affine`` (columns of its 3x3 part).

    Returns (deviation in degrees, the pair of axes e.g. "x/z", their angle in degrees). The columns must have
    non-zero length (``validation.check_spacing`` refuses others first).
    """
    rzs = np.asarray(affine, dtype=np.float64)[:3, :3]
    units = rzs / np.linalg.norm(rzs, axis=0)
    best = (0.0, "x/y", 90.0)
    for i, j in itertools.combinations(range(3), 2):
        angle = math.degrees(math.acos(float(np.clip(units[:, i] @ units[:, j], -1.0, 1.0))))
        if abs(angle - 90.0) > best[0]:
            best = (abs(angle - 90.0), f"{AXES[i]}/{AXES[j]}", angle)
    return best


def shear_warning(path: str | Path | None, img: nib.Nifti1Image, tol_deg: float = SHEAR_TOL_DEG) -> str | None:
    """One-line warning when the voxel axes are not perpendicular by more than ``tol_deg`` degrees, else None.

    Says the angle, how the scan is segmented (as the official tool: along the voxel axes, the shear ignored)
    and what the mask means (on the input's voxel grid, with its affine). When the header's voxel sizes (pixdim)
    differ from the affine's column lengths it says so too, so that ``validation.check_spacing``'s own line about
    that mismatch is left out for such a file (one warning, not two).
    """
    affine = np.asarray(img.affine, dtype=np.float64)
    dev, pair, angle = largest_shear_deg(affine)
    if dev <= tol_deg:
        return None
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    pixdim = "" if np.allclose(zooms, norms, rtol=1e-3, atol=1e-4) else \
        f" (not the header's {fmt_vec(zooms)} mm)"
    return (f"{path}: sheared affine: voxel axes {pair} are at {angle:.2f} degrees, not 90 ({dev:.2f} degrees of "
            f"shear; a gantry tilt?); segmented as the official TotalSegmentator does, along the voxel axes at the "
            f"affine's voxel size {fmt_vec(norms)} mm{pixdim} as if they were perpendicular, so the model sees the "
            "anatomy skewed by that angle and may be less accurate; the mask is on the scan's own voxel grid with "
            "its affine, so it lines up with the scan; for the best result resample the scan onto a "
            "perpendicular grid (or convert the DICOM with tilt correction)")
