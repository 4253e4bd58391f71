"""DICOM input, step 1: which files are DICOM, their headers (pydicom, pixel data deferred), grouped into series by
SeriesInstanceUID whatever the file names, and the series to segment (common.imaging.dicom tells the whole story).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from common.core.errors import InputError

DICOM_MAGIC = b"DICM"  # Part 10 files: 128-byte preamble, then "DICM"
RAW_DATASET_GROUPS = (0x0002, 0x0008)  # a dataset written without the preamble starts with one of these groups
# Not images: structure sets, segmentations, dose grids, reports, presentation states, key objects, registrations.
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "SEG", "RTDOSE", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG",
                                  "RWV", "DOC", "FID", "PLAN"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DICOMDIR = "DICOMDIR"
DICOMDIR_REASON = "DICOMDIR (a CD's index file)"
_STORAGE = "1.2.840.10008.5.1.4.1.1."
# Storage SOP classes that are not images (whatever their Modality says), and the modality to name them by;
# a key ending in "." covers the whole family (all SR documents, all presentation states).
NON_IMAGE_SOP_CLASSES = {_STORAGE + k: v for k, v in {
    "481.2": "RTDOSE", "481.3": "RTSTRUCT", "481.4": "RTRECORD", "481.5": "RTPLAN", "481.6": "RTRECORD",
    "481.7": "RTRECORD", "481.8": "RTPLAN", "481.9": "RTRECORD", "66": "RAW", "66.1": "REG", "66.2": "FID",
    "66.3": "REG", "66.4": "SEG", "66.5": "SEG", "104.1": "DOC", "104.2": "DOC", "88.59": "KO", "88.": "SR",
    "11.": "PR"}.items()}
# (7FE0,0010) Pixel Data, (7FE0,0008) Float and (7FE0,0009) Double Float Pixel Data, as little/big-endian tags
PIXEL_TAGS = frozenset(bytes.fromhex(h) for h in ("e07f1000", "e07f0800", "e07f0900", "7fe00010", "7fe00008",
                                                  "7fe00009"))
MIN_SLICES = 4  # dicom2nifti's validate_slicecount refuses 3 or fewer (a localizer, it says)
ZIP_KIND = "zip archive"
FOLDER_KIND = "folder"


def is_dicom_file(path: Path) -> bool:
    """True for a file whose content is DICOM: the Part 10 preamble ("DICM" at byte 128), or a dataset written
    without it (starting with a group 0002/0008 element, as some old exporters do); also any ``*.dcm`` (a
    broken one is then reported by the loader, not silently skipped)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == DICOM_MAGIC or _is_raw_dataset(head)


def non_image_kind(ds, has_pixels: bool) -> str | None:
    """What the dataset ``ds`` is when it is not an image slice: "DICOMDIR", or a modality such as "RTSTRUCT",
    "SR", "SEG" (decided by its SOP Class UID, then its Modality, then the absence of pixel data); None for an
    image slice, and for a dataset the loader must judge (no SeriesInstanceUID, or an image storage class
    without pixel data: a truncated slice, reported in one line by the loader)."""
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    if sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return DICOMDIR
    if "SeriesInstanceUID" not in ds:
        return None
    modality = str(ds.get("Modality", "") or "").upper()
    kind = NON_IMAGE_SOP_CLASSES.get(sop) or next(
        (v for k, v in NON_IMAGE_SOP_CLASSES.items() if k.endswith(".") and sop.startswith(k)), None)
    if kind is not None:
        return modality if modality in NON_IMAGE_MODALITIES else kind
    if modality in NON_IMAGE_MODALITIES:
        return modality
    if has_pixels or not sop or "Image Storage" in _sop_name(sop):
        return None
    return modality or _sop_name(sop) or "DICOM object"


def _sop_name(sop: str) -> str:
    from pydicom.uid import UID

    name = UID(sop).name
    return "" if name == sop else name


def object_kind(path: Path) -> tuple[str, bool] | None:
    """(kind, has pixel data) of a DICOM file that is not an image slice (``non_image_kind``); None for an image
    slice or a file pydicom cannot read (the loader reports that in one line). Only the header is read
    (``stop_before_pixels``); whether pixel data follow is seen from the tag at which the read stopped."""
    import pydicom

    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            force = fh.read(132)[128:132] != DICOM_MAGIC
            fh.seek(0)
            ds = pydicom.dcmread(fh, stop_before_pixels=True, force=force)
            has_pixels = fh.read(4) in PIXEL_TAGS
    except Exception:  # InvalidDicomError, EOFError, struct/Unicode errors...: the loader says which
        return None
    kind = non_image_kind(ds, has_pixels)
    return None if kind is None else (kind, has_pixels)


def non_image_reason(kinds: list[tuple[str, bool]]) -> str:
    """Why files of these non-image ``kinds`` (``object_kind``, DICOMDIR excluded) are not a scan, in one line:
    "RTSTRUCT series (no image data): not a scan"."""
    parts = list(dict.fromkeys(f"{kind} series ({'not an image series' if pixels else 'no image data'})"
                               for kind, pixels in kinds))
    return ", ".join(parts) + (": not a scan" if len(parts) == 1 else ": not scans")


def _is_raw_dataset(head: bytes) -> bool:
    """A little-endian dataset without preamble: (0002|0008, small element) then an explicit VR or a short length."""
    if len(head) < 8 or int.from_bytes(head[0:2], "little") not in RAW_DATASET_GROUPS:
        return False
    if int.from_bytes(head[2:4], "little") > 0x0100:
        return False
    return (head[4:6].isalpha() and head[4:6].isupper()) or int.from_bytes(head[4:8], "little") < 1024


@dataclass
class Source:
    """Where the files come from: ``label`` (the folder or zip the user gave, used in messages), ``root`` (the
    folder read: the series folder itself, or the zip's extraction folder), ``kind`` ("folder"/"zip archive")."""

    label: Path
    root: Path
    kind: str

    def name(self, path: Path) -> str:
        """A file's name for messages: relative to the series folder or to the zip's top."""
        return str(path.relative_to(self.root))


@dataclass
class Series:
    """One series: its UID and the datasets (headers) of its files, in path order."""

    uid: str
    datasets: list = field(default_factory=list)

    @property
    def first(self):
        return self.datasets[0]

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", "") or "?").upper()

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "").strip()

    @property
    def multiframe(self) -> bool:
        return any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in self.datasets)

    @property
    def n_slices(self) -> int:
        return sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in self.datasets)

    @property
    def is_image(self) -> bool:
        return any("PixelData" in ds and non_image_kind(ds, True) is None for ds in self.datasets)

    @property
    def localizer(self) -> bool:
        return all("LOCALIZER" in image_type(ds) for ds in self.datasets)

    @property
    def is_ct_volume(self) -> bool:
        return self.modality == "CT" and not self.localizer and self.n_slices >= MIN_SLICES

    def describe(self) -> str:
        what = f"{self.modality} series {self.uid}"
        if self.description:
            what += f" {self.description!r}"
        if self.localizer:
            what += " (localizer)"
        n = len(self.datasets)
        frames = f", {self.n_slices} frames" if self.multiframe else ""
        return f"{what} ({n} file{'s' if n != 1 else ''}{frames})"


def image_type(ds) -> list[str]:
    """ImageType (0008,0008) values, upper case ([] when absent)."""
    value = ds.get("ImageType", None)
    if value is None:
        return []
    return [str(value).upper()] if isinstance(value, str) else [str(v).upper() for v in value]


def dicom_files(source: Source, recursive: bool) -> list[Path]:
    """The DICOM files (by content) under ``source.root``; hidden entries left out; sorted by path."""
    if recursive:
        found = []
        for top, dirs, files in os.walk(source.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(top) / f for f in files if not f.startswith(".")]
    else:
        found = [p for p in source.root.iterdir() if not p.name.startswith(".")]
    return sorted(p for p in found if is_dicom_file(p))


def read_header(path: Path, source: Source):
    """The file's dataset as dicom2nifti reads it (pixel data deferred), or None for a non-image object such as
    a DICOMDIR. InputError for a file that is not readable DICOM or is truncated."""
    import pydicom

    with open(path, "rb") as fh:
        head = fh.read(132)
    force = head[128:132] != DICOM_MAGIC  # dicom2nifti itself only reads files with the preamble
    try:
        ds = pydicom.dcmread(str(path), defer_size="1 KB", force=force)
    except Exception as exc:  # InvalidDicomError, EOFError, struct/Unicode errors...: pydicom raises many types
        raise InputError(source.label, f"{source.name(path)} in the {source.kind} is not a readable DICOM file "
                                       f"({type(exc).__name__}: {first_line(exc)}); corrupt or truncated?") from exc
    if non_image_kind(ds, True) == DICOMDIR:
        return None
    if "SeriesInstanceUID" not in ds:
        raise InputError(source.label, f"{source.name(path)} in the {source.kind} is not a readable DICOM image (no "
                                       "SeriesInstanceUID); corrupt or truncated file?")
    return ds


def read_series(source: Source, recursive: bool) -> list[Series]:
    """All series found under ``source``, in order of their first file."""
    by_uid: dict[str, Series] = {}
    for path in dicom_files(source, recursive):
        ds = read_header(path, source)
        if ds is not None:
            uid = str(ds.SeriesInstanceUID)
            by_uid.setdefault(uid, Series(uid)).datasets.append(ds)
    return list(by_uid.values())


def choose_series(series: list[Series], source: Source) -> tuple[Series, list[str]]:
    """The CT series with the most slices (else the largest image series, with a warning); warnings name the
    others. InputError when there is no DICOM file or no image series."""
    if not series:
        raise InputError(source.label, f"the {source.kind} holds no DICOM files"
                                       + ("" if source.kind == ZIP_KIND else " (and is not a NIfTI file)"))
    images = [s for s in series if s.is_image]
    if not images:
        raise InputError(source.label, f"the {source.kind} holds no DICOM image series (only "
                                       + ", ".join(s.describe() for s in series) + ")")
    chosen = max(images, key=lambda s: (s.is_ct_volume, not s.multiframe, s.n_slices))
    said = []
    others = [s for s in images if s is not chosen]
    objects = [s for s in series if not s.is_image]
    if others or objects:
        text = f"{source.label} holds {len(series)} DICOM series: segmented {chosen.describe()}"
        if others:
            text += ", not " + ", ".join(s.describe() for s in others) + "; put each series in its own folder to " \
                                                                           "segment it"
        if objects:
            text += "; not image series, ignored: " + ", ".join(s.describe() for s in objects)
        said.append(text)
    if not chosen.is_ct_volume:
        said.append(f"{source.label}: no CT series with at least {MIN_SLICES} slices; segmented "
                        f"{chosen.describe()}; the CT model's output is meaningless for other images")
    return chosen, said


# choose_series says what 06 and totalseg-fast do with the series; 01 --from imports it instead
IMPORT_WORDING = (("DICOM series: segmented ", "DICOM series: imported "), ("slices; segmented ", "slices; imported "),
                  ("to segment it", "to import it"))


def import_wording(message: str) -> str:
    """``message`` (one of choose_series's warnings) as 01 --from says it: "imported", not "segmented"."""
    for old, new in IMPORT_WORDING:
        message = message.replace(old, new)
    return message


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
