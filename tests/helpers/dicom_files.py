"""DICOM series written at test time from NIfTI crops of the real CT (SimpleITK, then edited with pydicom), and
the forms users have them in: copied folders, extension-less files, zips."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom


def write_dicom_series(img: nib.Nifti1Image, folder: Path) -> None:
    """Write ``img`` (RAS NIfTI) as a CT DICOM series with SimpleITK's ImageSeriesWriter."""
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


def write_series(img: nib.Nifti1Image, folder: Path, uid_suffix: str = "", **tags) -> list[Path]:
    """``img`` as a DICOM series in LPS order (uint16, intercept -1024); ``tags`` set on every file."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt(("L", "P", "S")))
    write_dicom_series(img.as_reoriented(ornt), folder)
    files = sorted(folder.iterdir())
    for f in files:
        ds = pydicom.dcmread(f)
        stored = (ds.pixel_array.astype(np.int32) + 1024).astype(np.uint16)
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.PixelData = stored.tobytes()
        if uid_suffix:
            ds.SeriesInstanceUID += uid_suffix
            ds.SOPInstanceUID += uid_suffix
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(f)
    return files


def copy_series(series: Path, dest: Path) -> Path:
    shutil.copytree(series, dest)
    return dest


def zip_folder(folder: Path, target: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, prefix + f.name)
    return target


def extensionless(series: Path, tmp: Path, name: str = "pacs_export") -> Path:
    folder = copy_series(series, tmp / name)
    for i, f in enumerate(sorted(folder.iterdir())):
        f.rename(folder / f"IM{i:05d}")
    return folder

