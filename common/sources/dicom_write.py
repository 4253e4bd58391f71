"""A NIfTI volume written as a CT DICOM series (SimpleITK's writer): for cohorts and tests built at run time
from the shared CT (a DICOM input in the cohort benchmark, DICOM test cases)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def write_dicom_series(img: nib.Nifti1Image, folder: Path) -> None:
    """Write ``img`` (a NIfTI in any orientation; voxels (x, y, z), world RAS+ mm) as a CT DICOM series of
    int16 slices along its third axis into the new ``folder``, one file per slice (slice_000.dcm, ...)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    data = np.asanyarray(img.dataobj).astype(np.int16)
    affine = np.asarray(img.affine, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    vol = sitk.GetImageFromArray(data.transpose(2, 1, 0))  # (x, y, z) -> sitk's (z, y, x) array
    vol.SetSpacing(tuple(spacing))
    vol.SetOrigin(tuple(lps[:3, 3]))
    vol.SetDirection(tuple(direction.reshape(-1)))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    orient = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    for k in range(vol.GetDepth()):
        sl = vol[:, :, k]
        pos = vol.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [("0008|0060", "CT"), ("0020|000d", series_uid + ".0"), ("0020|000e", series_uid),
                           ("0008|0018", f"{series_uid}.{k + 1}"), ("0020|0013", str(k + 1)),
                           ("0020|0037", orient), ("0020|0032", "\\".join(f"{v:.6f}" for v in pos)),
                           ("0018|0050", f"{spacing[2]:.6f}"), ("0028|1052", "0"), ("0028|1053", "1")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(sl)
