"""DICOM series written at test time from NIfTI crops of the real CT (SimpleITK, then edited with pydicom), and
the forms users have them in: copied folders, extension-less files, zips."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from common.sources.dicom_write import write_dicom_series


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



# ---- a CD/PACS export: DICOMDIR + patient/study/series tree (pydicom's FileSet) ---------------------------------

CD_PATIENT_ID = "CD0001"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"


def _non_image_dataset(ct: pydicom.Dataset, sop_class: str, modality: str, series_number: int) -> pydicom.Dataset:
    """A dataset without pixel data in ``ct``'s patient and study, in a series of its own."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, 1
    ds.SeriesInstanceUID = generate_uid()
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "FrameOfReferenceUID"):
        setattr(ds, keyword, ct.get(keyword, ""))
    return ds


def _code(value: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def sr_dataset(ct: pydicom.Dataset) -> pydicom.Dataset:
    """A Basic Text SR (a radiology report) on ``ct``'s study: no pixel data."""
    ds = _non_image_dataset(ct, BASIC_TEXT_SR, "SR", 90)
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = ct.get("StudyDate", "20240101"), ct.get("StudyTime", "120000")
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("18748-4", "Diagnostic Imaging Report")]
    text = pydicom.Dataset()
    text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", "No acute findings."
    text.ConceptNameCodeSequence = [_code("121071", "Finding")]
    ds.ContentSequence = [text]
    return ds


def rtstruct_dataset(ct: pydicom.Dataset, z_mm: float) -> pydicom.Dataset:
    """An RT Structure Set with one square contour at z = ``z_mm`` on ``ct``'s frame of reference: no pixel data."""
    ds = _non_image_dataset(ct, RT_STRUCTURE_SET, "RTSTRUCT", 91)
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "organs", "20240101", "120000"
    ref = pydicom.Dataset()
    ref.FrameOfReferenceUID = ds.FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence = [ref]
    roi = pydicom.Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = 1, ds.FrameOfReferenceUID, "liver"
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = [roi]
    contour = pydicom.Dataset()
    contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", 4
    contour.ContourData = [v for x, y in ((0, 0), (20, 0), (20, 20), (0, 20)) for v in (x - 40.0, y - 180.0, z_mm)]
    roi_contour = pydicom.Dataset()
    roi_contour.ReferencedROINumber, roi_contour.ROIDisplayColor = 1, [255, 0, 0]
    roi_contour.ContourSequence = [contour]
    ds.ROIContourSequence = [roi_contour]
    return ds


def write_cd_export(img: nib.Nifti1Image, root: Path) -> dict[str, Path]:
    """A CD/PACS export of ``img`` as pydicom's FileSet writes one: ``root/DICOMDIR`` and a patient/study/series
    tree of files without extension (PT000000/ST000000/SE00000k/IM0000nn) holding the CT series (write_series),
    an SR report and an RTSTRUCT, each a series of its own. Returns {"DICOMDIR": file, "CT"|"SR"|"RTSTRUCT": the
    series folder}."""
    import tempfile

    from pydicom.fileset import FileSet
    from pydicom.uid import generate_uid

    with tempfile.TemporaryDirectory(prefix="cd-export-") as tmp:
        staging = Path(tmp)
        study = {"PatientID": CD_PATIENT_ID, "PatientName": "CD^Export", "StudyID": "1", "SeriesNumber": 2,
                 "AccessionNumber": "A1", "FrameOfReferenceUID": generate_uid(), "SeriesDescription": "abdomen 3mm"}
        files = write_series(img, staging / "ct", **study)
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        z_mm = float(first.ImagePositionPatient[2])
        for name, ds in (("sr.dcm", sr_dataset(first)), ("rs.dcm", rtstruct_dataset(first, z_mm))):
            ds.save_as(staging / name, enforce_file_format=True)
            files.append(staging / name)
        fs = FileSet()
        for f in files:
            fs.add(f)
        fs.write(root)
    where = {"DICOMDIR": root / "DICOMDIR"}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "DICOMDIR"):
        where.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).Modality), f.parent)
    return where
