"""Single-scan mode of the clinical app: one scan segmented (or given with the user's own segmentation), shown in
three planes, summarised per structure, and its label map, passport and statistics.json offered for download.
The work is registration.single; this module is only its page."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import streamlit as st

from common.core.errors import InputError
from registration import app_cache
from registration.app_inputs import AppContext, pick_scan
from registration.app_viewer import three_planes
from registration.app_views import to_ras
from registration.single import SingleResult, own_single, segment_single, single_rows

_RUNS = itertools.count(1)  # folder names of successive results in one session
COLUMNS = {"structure": st.column_config.TextColumn("structure"),
           "label": st.column_config.NumberColumn("label"),
           "volume_ml": st.column_config.NumberColumn("volume (mL)", format="%.2f"),
           "mean_hu": st.column_config.NumberColumn("mean HU", format="%.1f"),
           "touches_border": st.column_config.CheckboxColumn("touches border"),
           "statistics_volume_mm3": st.column_config.NumberColumn("statistics.json volume (mm³)", format="%.1f",
                                                                 help="as the official tool: 0 at the border"),
           "statistics_mean_hu": st.column_config.NumberColumn("statistics.json mean HU", format="%.1f")}


@dataclass
class Display:
    """The viewer settings of the sidebar: HU ``window`` (low, high), label opacity ``alpha`` (0-1)."""

    window: tuple[float, float]
    alpha: float
    structure: str | None = None  # highlighted at first (the URL's ``structure=``)


def tile_progress(scan, session):
    """A progress bar and its ``on_tiles(n)`` callback for a segmentation of ``scan`` (counts model tiles)."""
    from registration.app_model import expected_tiles

    total = expected_tiles(scan, session.spec, session.cfg.segment.tile_step)
    bar = st.progress(0.0, text="loading the scan and resampling it to the model's 3 mm grid…")
    done = [0]

    def on_tiles(n: int) -> None:
        done[0] += n
        if total:
            text = f"model: tile {done[0]} of {total}" + (" — resampling back and writing the outputs…"
                                                            if done[0] >= total else "")
            bar.progress(min(done[0] / total, 1.0), text=text)
        else:
            bar.progress(0.5, text=f"model: tile {done[0]}")

    return on_tiles


def run_model(ctx: AppContext, what: str):
    """The shared model session (built on first use), or None with the one-line reason shown."""
    try:
        session = app_cache.model_session(ctx.weights_mode, ctx.config)
        st.session_state["model_notes"] = "; ".join(session.notes)
        return session
    except (InputError, OSError, RuntimeError) as exc:
        st.error(f"{what}: the model is unavailable: {exc}")
        return None


def _run(ctx: AppContext, choice) -> None:
    """Segment or read ``choice``; the result (or the one-line error) goes into the session state."""
    state = st.session_state
    state.pop("single_error", None)
    folder = ctx.work / "single" / f"{choice.scan_id}-{next(_RUNS)}"
    try:
        if choice.segmentation is None:
            session = run_model(ctx, choice.scan.name)
            if session is None:
                return
            with st.status(f"Segmenting {choice.scan.name} (one scan at a time per server)…", expanded=True) as box:
                result = segment_single(choice, folder, session, tile_progress(choice.scan, session))
                box.update(label=f"Segmented {choice.scan.name}", state="complete", expanded=False)
        else:
            with st.spinner(f"Reading {choice.segmentation.name} and writing its outputs…"):
                result = own_single(choice, folder)
    except InputError as exc:
        state["single_error"] = str(exc)
        state.pop("single_result", None)
        return
    ct, spacing = to_ras(np.asanyarray(result.volume.image.dataobj), result.volume.affine)
    labels, _ = to_ras(result.labels, result.volume.affine)
    state["single_result"] = {"result": result, "ct": ct, "labels": labels, "spacing": spacing,
                              "rows": single_rows(result), "token": folder.name}


def page(ctx: AppContext, display: Display) -> None:
    """The single-scan page: the scan's widgets in the sidebar, the result in the main area."""
    with st.sidebar:
        choice = pick_scan(ctx, "single", "Scan")
        label = "Segment" if choice is None or choice.segmentation is None else "Load segmentation"
        go = st.button(label, type="primary", disabled=choice is None, key="single_run", width="stretch")
    if go and choice is not None:
        _run(ctx, choice)
    if st.session_state.get("single_error"):
        st.error(st.session_state["single_error"])
    shown = st.session_state.get("single_result")
    if shown is None:
        st.info("Choose a scan in the sidebar (and, if you have one, its segmentation), then press "
                f"**{label}**.")
        return
    _show(shown, display)


def _show(shown: dict, display: Display) -> None:
    """The planes, the table and the downloads of one result."""
    result: SingleResult = shown["result"]
    st.markdown(f"**{result.choice.scan.name}** — {result.source}")
    for line in result.messages:
        st.warning(line)
    three_planes(f"single_{shown['token']}", shown["ct"], shown["labels"], shown["spacing"], result.names,
                 display.window, display.alpha, display.structure)
    st.markdown("**Structures** (volume and mean HU from the label map on the scan's grid; statistics.json as "
                "the official tool writes it)")
    st.dataframe(shown["rows"], column_config=COLUMNS, hide_index=True)
    downloads = (("ml", "label map (--ml)", "application/gzip"), ("passport", "passport.json", "application/json"),
                 ("statistics", "statistics.json", "application/json"))
    for col, (name, text, mime) in zip(st.columns(len(downloads)), downloads, strict=True):
        path = result.files[name]
        col.download_button(f"Download {text}", path.read_bytes(), file_name=path.name, mime=mime,
                            key=f"single_dl_{name}_{shown['token']}", width="stretch")
