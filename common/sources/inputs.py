"""The scans a run processes: --input, else ct_data/ and its variant folders, else the embedded phantom."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from common.core.errors import InputError
from common.core.paths import CT_DATA, EMBEDDED_DIR, PROJECT_ROOT
from common.imaging.discovery import Batch, discover, merge
from common.imaging.scan_paths import is_nifti_path, is_zip_path

DEFAULT_SUBFOLDERS = ("realistic", "clinical")  # searched after ct_data/'s own scans, in this order


def resolve_inputs(input_arg: str | None, max_samples: int | None = None, log: Callable[[str], object] = print, *,
                   output_dirs: tuple[Path, ...] = (), output_files: tuple[Path, ...] = ()) -> Batch:
    """The batch to process (common.imaging.discovery.Batch: scans with unique ids, ignored and refused entries)
    and a one-line description of where it came from (``batch.source``).

    --input (a file, a DICOM series folder, or a folder searched recursively) wins; else ct_data/ (its own
    NIfTI files, DICOM series folders and zips of them, then the realistic-size variants in ct_data/realistic/ made by 01
    --realistic, then the clinical-size multi-tile scans in ct_data/clinical/ made by 01 --clinical, last so
    that a sweep over the first scans stays on small ones); else the embedded synthetic phantom (written once
    under benchmarks/embedded/). ``output_dirs``/``output_files``: this run's outputs, never taken as inputs.
    Raises InputError when --input does not exist or holds nothing to process.
    """
    where = {"output_dirs": output_dirs, "output_files": output_files}
    if input_arg:
        root = Path(input_arg)
        if not root.exists() and not root.is_symlink():
            raise InputError(root, "input not found")
        batch = discover(root, **where)
        batch.source = f"--input {input_arg}"
        if not batch.scans and not batch.refused:
            why = "; ".join(f"{Path(i['file']).name}: {i['reason']}" for i in batch.ignored[:3])
            raise InputError(root, "nothing to do: no scan found" + (f" ({len(batch.ignored)} ignored — {why})"
                                                                     if batch.ignored else " (empty)"))
    else:
        parts = []
        for folder in (CT_DATA, *(CT_DATA / name for name in DEFAULT_SUBFOLDERS)):
            if not folder.is_dir():
                continue
            part = discover(folder, recursive=False, **where)
            part.ignored = [i for i in part.ignored if not (folder == CT_DATA and Path(i["file"]).name
                                                             in (*DEFAULT_SUBFOLDERS, "downloads"))]
            for scan in [p for p in part.scans if p.is_file() and not is_nifti_path(p) and not is_zip_path(p)]:
                part.scans.remove(scan)
                part.ignored.append({"file": str(scan), "reason": "not a NIfTI file, DICOM series folder or zip"})
            parts.append(part)
        batch = merge(parts)
        batch.source = f"ct_data/ ({len(batch.scans)} scans)"
        if not batch.scans:
            batch = discover(embedded_phantom(log))
            batch.source = "embedded synthetic CT phantom (ct_data/ holds no scans)"
    for note in batch.notes:
        log(f"note: {note}")
    return batch.limit(max_samples)


def embedded_phantom(log: Callable[[str], object] = print) -> Path:
    """The synthetic CT phantom (0.8 x 0.8 x 1.5 mm, clinical size) with ground truth; generated once."""
    from common.sources.phantom import write_phantom

    ct = EMBEDDED_DIR / "phantom_ct.nii.gz"
    if not ct.exists() or not (EMBEDDED_DIR / "phantom_ct_labels.nii.gz").exists():
        log(f"ct_data/ is empty: writing the embedded synthetic CT phantom to {ct.relative_to(PROJECT_ROOT)}")
        write_phantom(EMBEDDED_DIR, name="phantom_ct")
    return ct
