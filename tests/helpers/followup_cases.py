"""A follow-up pair with known truth for the clinical app's tests: the shared real CT with its real label map as the
baseline, and the same anatomy moved by a known rigid + smooth warp (registration.synthetic) as the follow-up.
Arrays are (x, y, z); world coordinates mm, RAS+."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from common.imaging.geometry import voxel_to_world
from registration.synthetic import make_moving, random_known_transform

BODY_HU = -300.0  # voxels above this are the body: where the warp's bumps are centred


def write_followup_pair(ct: Path, seg: Path, folder: Path, seed: int = 7) -> dict[str, Path]:
    """Baseline (``ct`` and its label map ``seg``, copied) and a follow-up moved by a seeded known transform (at
    most 4 degrees, 8 mm, bumps of 3 mm) into ``folder``, named so that discovery pairs each scan with its
    ``_seg`` label map. Returns the four paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"baseline": folder / "baseline.nii.gz", "baseline_seg": folder / "baseline_seg.nii.gz",
           "followup": folder / "followup.nii.gz", "followup_seg": folder / "followup_seg.nii.gz"}
    shutil.copyfile(ct, out["baseline"])
    shutil.copyfile(seg, out["baseline_seg"])
    img = nib.load(str(ct))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    labels = np.asanyarray(nib.load(str(seg)).dataobj).astype(np.uint8)
    rng = np.random.default_rng(seed)
    body = voxel_to_world(np.argwhere(data > BODY_HU)[::50], img.affine)
    centre = voxel_to_world((np.array(data.shape) - 1)[None] / 2.0, img.affine)[0]
    known = random_known_transform(rng, centre, body, max_angle_deg=4.0, max_shift_mm=8.0, peak_mm=3.0)
    m_img, m_lab, m_aff = make_moving(data, labels, img.affine, known)
    nib.save(nib.Nifti1Image(np.rint(m_img).astype(np.int16), m_aff), str(out["followup"]))
    nib.save(nib.Nifti1Image(m_lab.astype(np.uint8), m_aff), str(out["followup_seg"]))
    return out
