"""The official tool's optional post-processing and DICOM writers, called as TotalSegmentator 2.18 calls them
(totalsegmentator/nnunet.py, nnUNet_predict_image), so that ``-rmb``, ``-v1o``, ``-sl`` and ``-ot dicom_*`` give
its results:

- ``--remove_small_blobs [mm3]``: its ``postprocessing.remove_small_blobs_multilabel`` on the 3 mm labels (before
  they are resampled back), every class, components under ``mm3`` (default 200 mm³) removed;
- ``--v1_order``: its ``libs.reorder_multilabel_like_v1`` on the full-resolution labels, and the v1 class map
  (``class_map["total_v1"]``) in the label-map extension (v2-only classes become 0);
- ``--save_lowres``: the 3 mm labels in the input's axis order, with the header nnU-Net's SimpleITK writer gives
  the official 3 mm prediction (qform and sform code 1, units mm and s);
- ``--output_type dicom_seg | dicom_rtstruct``: its ``dicom_io.save_mask_as_dicomseg`` (highdicom) and
  ``save_mask_as_rtstruct`` (rt_utils) with the input series as the reference.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

DICOM_TYPES = ("dicom_seg", "dicom_rtstruct")
DEFAULT_BLOB_MM3 = 200.0  # the official default of --remove_small_blobs without a value


def remove_small_blobs(labels: np.ndarray, grid: nib.Nifti1Image, label_map: dict[int, str],
                       min_mm3: float) -> np.ndarray:
    """Connected components smaller than ``min_mm3`` removed from every class of ``label_map``: labels
    (x, y, z) uint8 on ``grid`` (the 3 mm image whose zooms, in mm, give the voxel volume)."""
    from totalsegmentator.postprocessing import remove_small_blobs_multilabel

    vox_vol = float(np.prod(grid.header.get_zooms()[:3]))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints per-class progress
        out = remove_small_blobs_multilabel(labels.astype(np.uint8), label_map, list(label_map.values()),
                                            interval=[min_mm3 / vox_vol, 1e10], debug=False, quiet=True)
    return np.asarray(out, dtype=np.uint8)


def v1_label_map() -> dict[int, str]:
    """TotalSegmentator v1's class map (id -> name), what ``--v1_order`` label maps carry."""
    from totalsegmentator.map_to_binary import class_map

    return dict(class_map["total_v1"])


def reorder_like_v1(labels: np.ndarray, label_map: dict[int, str]) -> np.ndarray:
    """Labels (any axes) renumbered from the v2 ids of ``label_map`` to v1's; v2-only classes become 0."""
    from totalsegmentator.libs import reorder_multilabel_like_v1

    return reorder_multilabel_like_v1(labels, label_map, v1_label_map())


def lowres_image(labels_canonical: nib.Nifti1Image, input_img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The 3 mm result as the official --save_lowres writes it: the canonical 3 mm labels with the header nnU-Net's
    SimpleITK writer gives its prediction (qform and sform code 1, units mm and s, pixdim[4:] 0), reoriented to the input's
    axes by the official ``alignment.undo_canonical`` (which, through nibabel, also rewrites the header codes),
    uint8."""
    from totalsegmentator.alignment import undo_canonical

    affine = np.asarray(labels_canonical.affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asanyarray(labels_canonical.dataobj).astype(np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4:] = 0  # SimpleITK writes no time step
    img = undo_canonical(img, input_img)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    return nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.uint8), img.affine, header)


def dicom_target(kind: str, path: Path) -> Path:
    """The file the official writer makes of ``path``: rt_utils adds ``.dcm`` to an RTSTRUCT name without it."""
    if kind == "dicom_rtstruct" and not path.name.endswith(".dcm"):
        return path.with_name(path.name + ".dcm")
    return path


def write_dicom_output(kind: str, labels: np.ndarray, selected: dict[int, str], series_folder: Path,
                       target: Path, affine: np.ndarray) -> Path:
    """A DICOM SEG (``kind`` "dicom_seg") or RTSTRUCT ("dicom_rtstruct") of ``labels`` ((x, y, z) in the input's
    grid, ids of ``selected``) at ``target``, referencing the CT series in ``series_folder`` (its image files
    only), written by the official writer. Returns the file written (rt_utils adds ``.dcm`` when missing)."""
    from totalsegmentator import dicom_io

    labels = np.asarray(labels, dtype=np.uint8)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), _quiet_logging():
        # (its tqdm bars and rt_utils' "Writing file to")
        if kind == "dicom_seg":
            dicom_io.save_mask_as_dicomseg(labels, selected, series_folder, target, affine)
            return target
        if kind == "dicom_rtstruct":
            dicom_io.save_mask_as_rtstruct(labels, selected, series_folder, target)
            return dicom_target(kind, target)
    raise ValueError(f"unknown DICOM output type {kind!r} (one of {', '.join(DICOM_TYPES)})")


@contextlib.contextmanager
def _quiet_logging():
    """highdicom and rt_utils log at INFO/WARNING on the root logger; the official CLI output has none of it."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
