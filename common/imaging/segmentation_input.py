"""A user's own segmentation of a scan, given instead of segmenting it: a label map (an official TotalSegmentator
``--ml`` file, whose header extension names the classes, or any integer label map with the total task's ids), a
folder of binary masks named ``<class name>.nii.gz`` (the official default output), or a zip of such a folder.

The result is one integer label map (x, y, z) on the scan's own voxel grid (a map on the same grid up to axis
order and direction is reoriented onto it, common.imaging.mask_io.align_to_grid) with its names. Every problem is
an InputError: one line naming the file.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.core.errors import InputError
from common.imaging.discovery import nifti_stem
from common.imaging.labels import total_class_ids, total_class_names_if_installed
from common.imaging.mask_io import align_to_grid, load_label_map
from common.imaging.scan_paths import is_nifti_path, is_zip_path
from common.imaging.volume import Volume

MAX_LABEL = 1000  # class ids beyond this are not a segmentation (TotalSegmentator's total task: 1-117)


@dataclass(frozen=True)
class UserSegmentation:
    """``labels`` (x, y, z) on the scan's grid, uint8 or uint16; ``names`` id -> class name; ``source`` the file or
    folder given; ``kind`` "label map" or "masks"; ``note`` one line on what was done to fit the scan (or None)."""

    labels: np.ndarray
    names: dict[int, str]
    source: Path
    kind: str
    note: str | None = None

    def describe(self) -> str:
        """One line: which segmentation this is (for the user)."""
        n = len(np.unique(self.labels)) - int((self.labels == 0).any())
        return f"your {self.kind} {self.source.name} ({n} structures)" + (f"; {self.note}" if self.note else "")


def load_segmentation(path: Path, scan: Volume) -> UserSegmentation:
    """The segmentation at ``path`` (a label map file, a folder of masks or a zip of one) on ``scan``'s grid."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "segmentation not found")
    if path.is_dir():
        return _from_masks(path, path, scan)
    if is_zip_path(path):
        from common.imaging.dicom_zip import extract_zip

        with tempfile.TemporaryDirectory(prefix="ts-masks-") as tmp:
            extract_zip(path, Path(tmp))
            return _from_masks(Path(tmp), path, scan)
    if not is_nifti_path(path):
        raise InputError(path, "not a segmentation: give a label map (.nii/.nii.gz), a folder of masks or a zip of one")
    labels, note = _on_scan_grid(path, scan)
    return UserSegmentation(_compact(labels), _names_of(path, labels), path, "label map", note)


def _on_scan_grid(path: Path, scan: Volume) -> tuple[np.ndarray, str | None]:
    """The integer label array of the NIfTI ``path`` on the scan's grid, and a note when it was reoriented."""
    loaded = load_label_map(path)
    data = loaded.data[..., 0] if loaded.data.ndim == 4 and loaded.data.shape[3] == 1 else loaded.data
    if data.ndim != 3:
        raise InputError(path, f"label map is {data.ndim}-D; a 3-D label map on the scan's grid is needed")
    if data.size and int(data.max()) > MAX_LABEL:
        raise InputError(path, f"holds values up to {int(data.max())}, not class ids (1-{MAX_LABEL}): is it a scan "
                               "rather than a segmentation?")
    aligned = align_to_grid(scan.shape[:3], scan.affine, data, loaded.affine, f"scan {scan.path.name}")
    if aligned.problem:
        raise InputError(path, aligned.problem)
    return aligned.data, (f"reoriented {aligned.reoriented} onto the scan's grid" if aligned.reoriented else None)


def _compact(labels: np.ndarray) -> np.ndarray:
    """The labels as uint8 (uint16 when an id exceeds 255)."""
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16, copy=False)


def _names_of(path: Path, labels: np.ndarray) -> dict[int, str]:
    """Class names of a label map file: its TotalSegmentator label-map header extension when it has one (an
    official ``--ml`` file), else the total task's names; ids without a name get ``label_<id>``."""
    import nibabel as nib

    names: dict[int, str] = {}
    try:
        from totalsegmentator.nifti_ext_header import load_multilabel_nifti

        names = {int(k): str(v) for k, v in load_multilabel_nifti(nib.load(str(path)))[1].items() if int(k) != 0}
    except Exception:  # no extension, or one that is not a label table: the total task's ids
        names = {}
    if not names:
        names = total_class_names_if_installed()
    present = [int(v) for v in np.unique(labels) if v != 0]
    return {k: names.get(k, f"label_{k}") for k in sorted(set(names) | set(present))}


def _from_masks(folder: Path, source: Path, scan: Volume) -> UserSegmentation:
    """A label map from the binary masks ``<name>.nii[.gz]`` in ``folder`` (searched recursively): the total task's
    id for a known class name, the next free id for another name. Overlapping masks: the later name wins."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_nifti_path(p) and not p.name.startswith("."))
    if not files:
        raise InputError(source, "no masks (.nii/.nii.gz files) found: give a label map or a folder of masks")
    known = total_class_ids()
    ids: dict[str, int] = {}
    for name in (nifti_stem(p.name) for p in files):
        if name in ids:
            raise InputError(source, f"two masks named {name}")
        ids[name] = known.get(name, 0)
    free = max([*known.values(), 0]) + 1
    for name in sorted(n for n, k in ids.items() if k == 0):
        ids[name], free = free, free + 1
    labels = np.zeros(scan.shape[:3], dtype=np.uint16 if free > 256 else np.uint8)
    notes = set()
    for file in files:
        mask, note = _on_scan_grid(file, scan)
        if mask.size and int(mask.max()) > 1:
            raise InputError(file, f"not a binary mask (values up to {int(mask.max())}); a mask holds 0 and 1")
        labels[mask > 0] = ids[nifti_stem(file.name)]
        if note:
            notes.add(note)
    names = {k: n for n, k in sorted(ids.items(), key=lambda item: item[1])}
    return UserSegmentation(labels, names, source, "masks", "; ".join(sorted(notes)) or None)
