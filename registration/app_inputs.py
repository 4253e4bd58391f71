"""The clinical app's inputs: a scan from the data folder or an upload, and optionally the user's own segmentation
(a label map from the data folder, or uploaded: a label map, a zip of a mask folder, or the mask files).

Uploads are written into this browser session's temporary folder (registration.app_cache.session_folder), each
under the hash of its content, and refused above the size limit in one line. Nothing is checked here beyond the
size: the scan and the segmentation are read and checked when the work starts, by the same functions as the
command lines, so a bad file gets the same one-line message.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from common.core.errors import InputError
from common.core.text import fmt_bytes
from common.imaging.discovery import Batch
from common.imaging.scan_paths import scan_id
from registration.followup import ScanChoice

SCAN_HELP = "a NIfTI file (.nii, .nii.gz) or a zip of one DICOM series"
SEG_HELP = "a label map (.nii.gz, e.g. TotalSegmentator --ml), a zip of a mask folder, or the mask files"
OWN, OURS = "my own segmentation", "segment it with the model"
UPLOAD = "upload…"


@dataclass
class AppContext:
    """What every page needs: ``batch`` (the data folder's scans, None when it has none), ``label_files`` (label
    maps beside them), ``out06`` (06's output folder, reused), ``work`` (this session's folder), the upload limit
    in MB, the weights mode and run configuration, and the URL's query parameters (defaults for the pickers)."""

    batch: Batch | None
    label_files: list[Path]
    out06: Path
    work: Path
    max_upload_mb: int
    weights_mode: str
    config: str | None
    params: dict[str, str] = field(default_factory=dict)

    def scan_ids(self) -> list[str]:
        return [self.batch.ids[s] for s in self.batch.scans] if self.batch else []

    def scan_path(self, sid: str) -> Path:
        return next(s for s in self.batch.scans if self.batch.ids[s] == sid)


def _safe_name(name: str) -> str:
    """A file name made of letters, digits, '.', '_' and '-' (an upload's own name, without folders)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(name.replace("\\", "/")).name).lstrip(".") or "upload"


def save_uploads(files: list, ctx: AppContext, slot: str) -> Path:
    """The uploaded ``files`` (streamlit UploadedFile) in the session folder: one file's path, or the folder holding
    several (mask files). InputError (one line) for a file over the limit or two files of one name."""
    ids = tuple(getattr(f, "file_id", None) or id(f) for f in files)
    known = st.session_state.get(f"_saved_{slot}")
    if known and known[0] == ids and Path(known[1]).exists():  # the same upload on a rerun: saved already
        return Path(known[1])
    limit = ctx.max_upload_mb * 1024 * 1024
    for f in files:
        if f.size > limit:
            raise InputError(f.name, f"{fmt_bytes(f.size)} is over the upload limit of {fmt_bytes(limit)}")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.getvalue()).digest())
    folder = ctx.work / "uploads" / slot / digest.hexdigest()[:16]
    names = [_safe_name(f.name) for f in files]
    if len(set(names)) != len(names):
        raise InputError(files[0].name, "two uploaded files have the same name")
    if len(files) > 1:
        folder = folder / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    for f, name in zip(files, names, strict=True):
        target = folder / name
        if not target.exists():
            from common.core.atomic import atomic_write_bytes

            atomic_write_bytes(target, f.getvalue())
    saved = folder / names[0] if len(files) == 1 else folder
    st.session_state[f"_saved_{slot}"] = (ids, str(saved))
    return saved


def pick_scan(ctx: AppContext, slot: str, title: str) -> ScanChoice | None:
    """The widgets of one scan (``slot``: "single", "baseline" or "followup"); None until it is complete. An
    upload over the limit is shown as one error line. URL defaults: ``<slot>=<scan id>``, ``<slot>_seg=<file>``."""
    st.markdown(f"**{title}**")
    ids = ctx.scan_ids()
    sources = (["data folder"] if ids else []) + ["upload"]
    source = st.radio("scan from", sources, key=f"{slot}_source", horizontal=True)
    try:
        if source == "data folder":
            default = ctx.params.get(slot)
            sid = st.selectbox("scan", ids, index=ids.index(default) if default in ids else 0, key=f"{slot}_scan")
            scan = ctx.scan_path(sid)
        else:
            up = st.file_uploader(SCAN_HELP, key=f"{slot}_upload", max_upload_size=ctx.max_upload_mb)
            if up is None:
                return None
            scan = save_uploads([up], ctx, slot)
            sid = f"{slot}_upload__{scan_id(scan)}"  # two uploads of one name (baseline, follow-up) stay apart
        segmentation = _pick_segmentation(ctx, slot)
    except InputError as exc:
        st.error(str(exc))
        return None
    if segmentation is False:
        return None
    return ScanChoice(scan, sid, segmentation)


def _pick_segmentation(ctx: AppContext, slot: str) -> Path | None | bool:
    """The user's segmentation (a path), None to segment with the model, False while an upload is awaited."""
    default = ctx.params.get(f"{slot}_seg")
    mode = st.radio("segmentation", [OURS, OWN], index=1 if default else 0, key=f"{slot}_segmode")
    if mode == OURS:
        return None
    names = [p.name for p in ctx.label_files]
    options = [*names, UPLOAD]
    pick = st.selectbox("label map", options, index=options.index(default) if default in options else 0,
                        key=f"{slot}_seg")
    if pick != UPLOAD:
        return ctx.label_files[names.index(pick)]
    ups = st.file_uploader(SEG_HELP, key=f"{slot}_seg_upload", accept_multiple_files=True,
                           max_upload_size=ctx.max_upload_mb)
    return save_uploads(ups, ctx, f"{slot}_seg") if ups else False
