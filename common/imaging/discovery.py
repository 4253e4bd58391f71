"""Finding the scans of a batch. Every entry found is a scan, reported as ignored, or refused; none vanishes.

- A scan is a NIfTI file, a zip archive (``*.zip``: a DICOM series, possibly in a sub-folder of the zip; its id
  is the name without .zip), any other regular file (it then fails to load with its own one-line error, e.g.
  "not a NIfTI file"), or a DICOM series folder (a folder holding a DICOM file, recognised by its content:
  common.imaging.dicom_series.is_dicom_file, whatever the name, as PACS exports without extensions have).
- Folders are searched recursively; symbolic links are followed once (a loop is refused, not followed).
- A folder whose DICOM files hold no image slice is not a scan (common.imaging.dicom_series.object_kind: SOP
  Class UID, Modality, no pixel data; headers only): as a CD/PACS export writes them, a ``DICOMDIR`` (the CD's
  index) and series folders of RTSTRUCT, SR, SEG, PR, KO, REG, RTPLAN or RTDOSE objects are listed as ignored,
  with their reason ("DICOMDIR (a CD's index file)", "RTSTRUCT series (no image data): not a scan").
- Ignored, with the reason in the result: files named like label maps (``*_seg``, ``*_labels``, ``*_mask``,
  ``*_gt``), README/LICENSE files, files inside a folder of DICOM files that are neither DICOM nor NIfTI.
  Silently left out: hidden entries (``.name``) and this run's own outputs when ``--out`` lies inside the
  input (``*_seg.nii.gz``, ``*_passport.json``, ``*_run.json`` and the result file).
- Scan ids (the stem of every output file) come from the path relative to the input root, parts joined
  with ``__`` (``p1/ct.nii.gz`` -> ``p1__ct``; a scan at the root keeps its plain stem). Ids that would still
  be equal (``a.nii`` beside ``a.nii.gz``, a DICOM folder ``a/`` beside ``a.zip``; compared ignoring case,
  as on case-insensitive file systems) get the kind of input appended (``a_nii``, ``a_niigz``, ``a_dicom``, ``a_zip``),
  said in one note; ids still equal after that are refused, each with one line naming the other input.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common.imaging.dicom_series import DICOMDIR, DICOMDIR_REASON, is_dicom_file, non_image_reason, object_kind
from common.imaging.scan_paths import is_nifti_path, is_zip_path

LABEL_FILE = re.compile(r"(_seg|_labels?|_mask|_gt)(_[a-z0-9]+)?$")
DOC_FILES = ("readme", "readme.md", "readme.txt", "license", "license.txt", "license.md")
OUTPUT_FILE = re.compile(r".+(_seg\.nii\.gz|_passport\.json|_run\.json)$")
ID_SEPARATOR = "__"


def nifti_stem(name: str) -> str:
    """``name`` without .nii/.nii.gz (any case)."""
    low = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def zip_stem(name: str) -> str:
    """``name`` without .zip (any case)."""
    return name[:-4] if name.lower().endswith(".zip") else name


def is_label_file(path: Path) -> bool:
    """Label maps beside scans (``x_seg``, ``x_labels``, ``x_seg_fast``, ``x_mask``, ``x_gt`` + .nii[.gz])."""
    return bool(LABEL_FILE.search(nifti_stem(path.name).lower()))


def is_dicom_dir(path: Path) -> bool:
    """A folder that holds at least one DICOM image file directly (a series folder; see ``dicom_content``)."""
    try:
        files = [p for p in path.iterdir() if not p.name.startswith(".") and _is_file(p)] if path.is_dir() else []
    except OSError:
        return False
    return dicom_content([p for p in files if is_dicom_file(p)]) is None


def dicom_content(files: list[Path]) -> list[tuple[Path, str, bool]] | None:
    """None when one of the DICOM ``files`` (one folder's) is an image slice, or one the loader must judge (the
    folder is then a series: a scan); else every file's (path, kind, has pixel data), none of them an image
    (common.imaging.dicom_series.object_kind: headers only, and only until the first image slice)."""
    kinds = []
    for p in files:
        kind = object_kind(p)
        if kind is None:
            return None
        kinds.append((p, *kind))
    return kinds


@dataclass
class Batch:
    """What a run was given: ``scans`` in processing order with unique ``ids`` (path -> output stem);
    ``ignored`` ({"file", "reason"}) were found but are not scans; ``refused`` ({"file", "scan_id", "error"})
    are scans that cannot be processed (recorded as failed); ``notes`` are one-line remarks (renamed ids)."""

    scans: list[Path] = field(default_factory=list)
    ids: dict[Path, str] = field(default_factory=dict)
    ignored: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = ""

    def limit(self, max_samples: int | None) -> Batch:
        """The first ``max_samples`` scans (refused entries count too, in order found)."""
        if max_samples is None:
            return self
        self.scans = self.scans[:max_samples]
        self.ids = {p: self.ids[p] for p in self.scans}
        return self


@dataclass
class _Found:
    path: Path
    rel_parts: tuple[str, ...]  # path relative to the input root, last part without .nii/.nii.gz/.zip
    kind: str  # "nifti", "dicom", "zip" or "other"


class _Walker:
    def __init__(self, output_dirs: Iterable[Path], output_files: Iterable[Path]):
        self.output_dirs = [Path(os.path.abspath(p)) for p in output_dirs]
        self.output_files = {Path(os.path.abspath(p)) for p in output_files}
        self.seen: set[str] = set()
        self.found: list[_Found] = []
        self.ignored: list[dict] = []
        self.refused: list[dict] = []

    def _ours(self, path: Path) -> bool:
        """This run's result file, or one of its output files (mask, passport, run record) in its output folder."""
        absolute = Path(os.path.abspath(path))
        return absolute in self.output_files or (absolute.parent in self.output_dirs
                                                 and bool(OUTPUT_FILE.match(path.name)))

    def ignore(self, path: Path, reason: str) -> None:
        self.ignored.append({"file": str(path), "reason": reason})

    def walk(self, folder: Path, rel: tuple[str, ...], recursive: bool = True) -> None:
        """Record what ``folder`` holds; ``rel``: its path parts below the input root (() for the root)."""
        try:
            real = os.path.realpath(folder)
            if real in self.seen:
                self.refused.append({"file": str(folder), "scan_id": ID_SEPARATOR.join(rel) or folder.name,
                                     "error": f"{folder}: symbolic link back into a folder already searched "
                                              f"({real}); not followed"})
                return
            self.seen.add(real)
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as exc:
            self.refused.append({"file": str(folder), "scan_id": ID_SEPARATOR.join(rel) or folder.name,
                                 "error": f"{folder}: cannot list the folder ({exc.strerror or exc})"})
            return
        files = [p for p in entries if not p.name.startswith(".") and not self._ours(p)]
        dicoms = [p for p in files if _is_file(p) and is_dicom_file(p)]
        in_folder = set(dicoms)
        objects = dicom_content(dicoms) if dicoms else []
        series = bool(dicoms) and objects is None
        if series:  # the root itself is named by its own name, as a scan given alone
            self.found.append(_Found(folder, rel or (folder.name,), "dicom"))
        elif objects:
            self.non_images(folder, objects)
        for p in files:
            parts = (*rel, nifti_stem(p.name))
            if _is_broken_link(p):
                self.refused.append({"file": str(p), "scan_id": ID_SEPARATOR.join(parts),
                                     "error": f"{p}: broken or looping symbolic link"})
            elif p.is_dir():
                if recursive:
                    self.walk(p, (*rel, p.name))
                else:
                    self.ignore(p, "subfolder not searched (pass it with --input)")
            elif p in in_folder:
                continue  # part of this folder's series, or listed by non_images
            else:
                self.file(p, parts, in_series=folder if series else None, in_dicom=folder if dicoms else None)

    def non_images(self, folder: Path, objects: list[tuple[Path, str, bool]]) -> None:
        """A folder of DICOM files none of which is an image slice: each DICOMDIR, then the folder (its series)."""
        for p, kind, _ in objects:
            if kind == DICOMDIR:
                self.ignore(p, DICOMDIR_REASON)
        others = [(kind, pixels) for _, kind, pixels in objects if kind != DICOMDIR]
        if others:
            self.ignore(folder, non_image_reason(others))

    def file(self, p: Path, parts: tuple[str, ...], in_series: Path | None = None,
             in_dicom: Path | None = None) -> None:
        name = p.name.lower()
        if name in DOC_FILES:
            self.ignore(p, "documentation file, not a scan")
        elif is_nifti_path(p) and is_label_file(p):
            self.ignore(p, "named like a label map (*_seg, *_labels, *_mask, *_gt); not segmented (pass the file "
                           "itself with --input to segment it)")
        elif is_zip_path(p):  # a zipped series is a scan, even inside a series folder
            self.found.append(_Found(p, (*parts[:-1], zip_stem(p.name)), "zip"))
        elif in_series is not None and not is_nifti_path(p):
            self.ignore(p, f"not a DICOM file, inside the DICOM series folder {in_series}")
        elif in_dicom is not None and not is_nifti_path(p):
            self.ignore(p, f"not a DICOM file, inside the folder of DICOM files {in_dicom}")
        else:
            self.found.append(_Found(p, parts, "nifti" if is_nifti_path(p) else "other"))


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:
        return False


def _is_broken_link(p: Path) -> bool:
    if not p.is_symlink():
        return False
    try:
        p.stat()
    except (OSError, RuntimeError):
        return True
    return False


def _kind_tag(found: _Found) -> str:
    if found.kind in ("dicom", "zip"):
        return found.kind
    name = found.path.name.lower()
    if name.endswith(".nii.gz"):
        return "niigz"
    if name.endswith(".nii"):
        return "nii"
    return re.sub(r"[^a-z0-9]", "", found.path.suffix.lower()) or "file"


def assign_ids(found: list[_Found], batch: Batch) -> None:
    """Unique scan ids for ``found`` (see the module docstring), appended to ``batch`` in order."""
    def groups(items: list[tuple[_Found, str]]) -> dict[str, list[tuple[_Found, str]]]:
        by: dict[str, list[tuple[_Found, str]]] = {}
        for item in items:
            by.setdefault(item[1].lower(), []).append(item)
        return by

    named = [(f, ID_SEPARATOR.join(f.rel_parts)) for f in found]
    renamed: dict[int, str] = {}
    for members in groups(named).values():
        if len(members) > 1:
            for f, base in members:
                renamed[id(f)] = f"{base}_{_kind_tag(f)}"
            batch.notes.append(f"scan id {members[0][1]!r} is shared by " + ", ".join(str(f.path) for f, _ in members)
                               + "; their outputs are named " + ", ".join(renamed[id(f)] for f, _ in members))
    final = [(f, renamed.get(id(f), base)) for f, base in named]
    clashes = {key: members for key, members in groups(final).items() if len(members) > 1}
    for f, sid in final:
        others = [str(g.path) for g, _ in clashes.get(sid.lower(), []) if g is not f]
        if others:
            batch.refused.append({"file": str(f.path), "scan_id": sid, "error": f"{f.path}: its scan id {sid!r} is "
                                  f"also that of {', '.join(others)}; rename one of them"})
        else:
            batch.scans.append(f.path)
            batch.ids[f.path] = sid


def discover(root: Path, *, output_dirs: Iterable[Path] = (), output_files: Iterable[Path] = (),
             recursive: bool = True) -> Batch:
    """The scans under ``root`` (a file, a DICOM series folder or a folder of scans); see the module docstring.

    ``output_dirs`` / ``output_files``: this run's output folder(s) and result file; our own outputs found
    there are never taken as inputs. ``recursive=False`` lists subfolders (other than series) as ignored.
    """
    root = Path(root)
    walker = _Walker(output_dirs, output_files)
    batch = Batch()
    if root.is_file():
        if is_zip_path(root):
            walker.found.append(_Found(root, (zip_stem(root.name),), "zip"))
        else:
            walker.found.append(_Found(root, (nifti_stem(root.name),), "other"))
    else:  # a series folder is a scan itself (walk); NIfTI files kept beside it are scans of their own
        walker.walk(root, (), recursive=recursive)
    assign_ids(walker.found, batch)
    batch.ignored += walker.ignored
    batch.refused += walker.refused
    return batch


def merge(batches: list[Batch]) -> Batch:
    """One batch from several roots (in order); ids made unique across them as within one."""
    found = [_Found(p, (b.ids[p],), "dicom" if p.is_dir() else "zip" if is_zip_path(p) else "other")
             for b in batches for p in b.scans]
    out = Batch()
    assign_ids(found, out)
    for b in batches:
        out.ignored += b.ignored
        out.refused += b.refused
        out.notes += b.notes
    return out
