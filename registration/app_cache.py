"""What the clinical app keeps between page runs (streamlit caches): the weights and the model session once per
server process, the scans of the data folder for a few seconds, and one temporary folder per browser session.

The session folder (uploads and everything computed from them) lives under one folder per server process and is
removed when the browser session ends (a session-scoped st.cache_resource: its ``on_release`` runs when the session
disconnects or is closed); the process folder is removed when the server exits.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path

import streamlit as st

from common.imaging.discovery import Batch, is_label_file
from registration.app_model import ModelSession, build_session, load_weights


@st.cache_resource(show_spinner="Finding the model's weights (once per server process)…")
def weights(mode: str):
    """(ModelSpec, notes) of ``mode`` (auto | official | standin), once per server process."""
    return load_weights(mode)


@st.cache_resource(show_spinner="Building the model session (once per server process)…")
def model_session(mode: str, config: str | None) -> ModelSession:
    """The run configuration and its predictor, built once per server process and shared by every session."""
    spec, _ = weights(mode)
    session = build_session(spec, Path(config) if config else None)
    session.notes.append(f"model session built at {time.strftime('%H:%M:%S')} (id {id(session):x})")
    return session


@st.cache_resource(show_spinner=False)
def _process_root() -> Path:
    """This server process's temporary folder (removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="ts-clinical-app-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


@st.cache_resource(scope="session", on_release=_remove, show_spinner=False)
def session_folder() -> Path:
    """This browser session's temporary folder: uploads and results; removed when the session ends."""
    return Path(tempfile.mkdtemp(prefix="session-", dir=_process_root()))


@st.cache_data(ttl=10, show_spinner="Looking for scans…")
def data_batch(data: str | None, out06: str) -> tuple[Batch | None, list[str], str | None]:
    """(the data folder's scans, the label maps beside them, one-line error) — ``data`` None: ct_data/ as 06 reads
    it (common.sources.inputs.resolve_inputs); 06's output folder is never taken as input."""
    from common.core.errors import InputError
    from common.sources.inputs import resolve_inputs

    try:
        batch = resolve_inputs(data, None, log=lambda _m: None, output_dirs=(Path(out06),))
    except InputError as exc:
        return None, [], str(exc)
    labels = [i["file"] for i in batch.ignored if is_label_file(Path(i["file"]))]
    return batch, labels, None
