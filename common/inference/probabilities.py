"""Class probabilities as nnU-Net 2.x exports them with ``save_probabilities`` (what TotalSegmentator's
``--save_probabilities PATH`` copies to PATH): nnunetv2.inference.export_prediction
``convert_predicted_logits_to_segmentation_with_correct_shape`` and ``export_prediction_from_logits``.

- softmax over the classes of the averaged logits (float32, torch, as LabelManager.apply_inference_nonlin);
  the labels are then the argmax of the probabilities, not of the logits (as nnU-Net does in this mode);
- uncropped into the pre-crop shape with background probability 1 outside nnU-Net's crop box
  (LabelManager.revert_cropping_on_probabilities), axes (C, z, y, x) of the 3 mm canonical image nnU-Net read;
- written as ``np.savez_compressed(PATH, probabilities=...)`` plus ``PATH.with_suffix(".pkl")``, the properties
  nnU-Net's SimpleITK reader and preprocessor record (spacing, origin and direction in LPS; crop box; shapes).

Memory: the full (C, z, y, x) float32 logits of the cropped 3 mm volume are held (118 x 4 bytes per voxel), so
this mode needs far more memory than the slab-wise labels of the default path, as it does in nnU-Net.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np

from common.inference.preprocess import Crop


def softmax_and_labels(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, *spatial) float32 logits -> (probabilities float32, labels uint8 = argmax over C of the probabilities)."""
    import torch

    with torch.no_grad():
        probs = torch.softmax(torch.from_numpy(np.ascontiguousarray(logits)).float(), 0)
        labels = probs.argmax(0).to(torch.uint8)
    return probs.numpy(), labels.numpy()


def uncrop_probabilities(probs: np.ndarray, crop: Crop, transpose_backward: tuple[int, ...]) -> np.ndarray:
    """Probabilities (C, *cropped) into the pre-crop shape, background 1 outside the crop box, then the plans'
    transpose undone: (C, z, y, x) in nnU-Net's reader axes."""
    out = np.zeros((probs.shape[0], *crop.shape_before), dtype=probs.dtype)
    out[0] = 1
    out[(slice(None), *crop.slices)] = probs
    return out.transpose([0, *[i + 1 for i in transpose_backward]])


def nnunet_properties(grid: nib.Nifti1Image, crop: Crop) -> dict:
    """The properties dict nnU-Net pickles beside the probabilities, for the 3 mm canonical image ``grid``
    (RAS affine, (x, y, z) array) it read through SimpleITK: spacing/origin/direction in SimpleITK's LPS and
    (x, y, z) order, ``spacing`` in (z, y, x), crop box and shapes in the plans' axes."""
    affine = np.asarray(grid.affine, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing_xyz = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing_xyz[None, :]
    return {
        "sitk_stuff": {"spacing": tuple(float(s) for s in spacing_xyz),
                       "origin": tuple(float(v) for v in lps[:3, 3]),
                       "direction": tuple(float(v) for v in direction.reshape(-1))},
        "spacing": [np.float64(s) for s in spacing_xyz[::-1]],
        "shape_before_cropping": tuple(int(s) for s in crop.shape_before),
        "bbox_used_for_cropping": [[int(s.start), int(s.stop)] for s in crop.slices],
        "shape_after_cropping_and_before_resampling": tuple(int(s.stop - s.start) for s in crop.slices),
    }


def save_probabilities(path: Path, probabilities: np.ndarray, properties: dict) -> tuple[Path, Path]:
    """``path`` (the npz, whatever its name, as the official tool copies it) and ``path.with_suffix('.pkl')``,
    each written atomically (common.core.atomic)."""
    from common.core.atomic import atomic_path, atomic_write_bytes

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: savez would append .npz to a name
        np.savez_compressed(fh, probabilities=probabilities)
    pkl = atomic_write_bytes(path.with_suffix(".pkl"), pickle.dumps(properties))
    return path, pkl
