"""DICOM input, step 1: which files are DICOM, their headers (pydicom, pixel data deferred), grouped into series by
SeriesInstanceUID whatever the file names, and the series to segment (common.imaging.dicom tells the whole story).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.core.errors import InputError

DICOM_MAGIC = b"DICM"  # Part 10 files: 128-byte preamble, then "DICM"
RAW_DATASET_GROUPS = (0x0002, 0x0008)  # a dataset written without the preamble starts with one of these groups
# Not images: structure sets, segmentations, dose grids, reports, presentation states, key objects, registrations.
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "SEG", "RTDOSE", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG",
                                  "RWV", "DOC", "FID", "PLAN"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
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
        return self.modality not in NON_IMAGE_MODALITIES and any("PixelData" in ds for ds in self.datasets)

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
    sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") if hasattr(ds, "file_meta") else "")
    if sop == DICOMDIR_SOP_CLASS or (ds.get("SOPClassUID", None) == DICOMDIR_SOP_CLASS):
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
    others = [s for s in series if s is not chosen]
    if others:
        said.append(f"{source.label} holds {len(series)} DICOM series: segmented {chosen.describe()}, not "
                        + ", ".join(s.describe() for s in others) + "; put each series in its own folder to segment it")
    if not chosen.is_ct_volume:
        said.append(f"{source.label}: no CT series with at least {MIN_SLICES} slices; segmented "
                        f"{chosen.describe()}; the CT model's output is meaningless for other images")
    return chosen, said


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
