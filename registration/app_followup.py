"""Follow-up mode of the clinical app: a baseline and a follow-up CT, each segmented with 06's own job (its outputs
reused when up to date) or given with the user's segmentation, registered by registration/register.py (rigid,
then thin-plate spline, with its options), and compared per structure. The work is registration.followup and
registration.followup_table; this module is only its page."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import streamlit as st

from common.core.errors import InputError
from registration.app_inputs import AppContext, pick_scan
from registration.app_single import Display, run_model, tile_progress
from registration.app_viewer import registered, side_by_side
from registration.app_views import to_ras
from registration.followup import Prepared, RegistrationSettings, prepare, register, warped_followup
from registration.followup_table import Thresholds, comparison_rows, reflag, write_comparison

_RUNS = itertools.count(1)
_DEFAULTS, _THRESHOLDS = RegistrationSettings(), Thresholds()
COLUMNS = {"structure": st.column_config.TextColumn("structure"),
           "volume_baseline_ml": st.column_config.NumberColumn("volume baseline (mL)", format="%.2f"),
           "volume_followup_ml": st.column_config.NumberColumn("volume follow-up (mL)", format="%.2f"),
           "volume_change_pct": st.column_config.NumberColumn("volume change (%)", format="%+.1f"),
           "mean_hu_baseline": st.column_config.NumberColumn("mean HU baseline", format="%.1f"),
           "mean_hu_followup": st.column_config.NumberColumn("mean HU follow-up", format="%.1f"),
           "mean_hu_change": st.column_config.NumberColumn("mean HU change", format="%+.1f"),
           "residual_rigid_mm": st.column_config.NumberColumn("residual rigid (mm)", format="%.2f",
                                                             help="registration.json: centroid residual after rigid"),
           "residual_mm": st.column_config.NumberColumn("residual rigid + TPS (mm)", format="%.2f"),
           "rigid_outlier": st.column_config.CheckboxColumn("rigid outlier"),
           "touches_border": st.column_config.TextColumn("touches border"),
           "flagged": st.column_config.TextColumn("flagged")}


def _settings() -> RegistrationSettings:
    """register.py's options as widgets (its defaults)."""
    with st.expander("Registration options (registration/register.py's)"):
        deformable = st.checkbox("thin-plate spline after rigid", value=_DEFAULTS.deformable, key="reg_deformable")
        smoothing = st.number_input("TPS smoothing", min_value=0.0, value=float(_DEFAULTS.smoothing), step=1e4,
                                    format="%g", key="reg_smoothing")
        threshold = st.number_input("rigid outlier residual (mm)", min_value=0.1,
                                    value=float(_DEFAULTS.residual_threshold_mm), step=1.0, key="reg_threshold")
        points = st.number_input("max TPS control points", min_value=0, value=int(_DEFAULTS.max_control_points),
                                 step=100, key="reg_points")
        mixed = st.checkbox("allow stand-in and official weights together", value=False, key="reg_mixed")
    return RegistrationSettings(deformable, float(smoothing), float(threshold), int(points), mixed)


def _out06(ctx: AppContext, scan: Path) -> Path:
    """06's folder for a data-folder scan (reused across sessions); this session's for an upload."""
    return ctx.work / "06_inference" if ctx.work in scan.parents else ctx.out06


def _prepare_side(ctx: AppContext, choice, title: str) -> Prepared | None:
    """One scan segmented (with its progress) or read; None when the model is unavailable (said)."""
    session = None
    if choice.segmentation is None:
        session = run_model(ctx, title)
        if session is None:
            return None
    st.write(f"{title}: {choice.scan.name}" + (f" with {choice.segmentation.name}" if choice.segmentation else ""))
    progress = tile_progress(choice.scan, session) if session is not None else None
    return prepare(choice, ctx.work, _out06(ctx, choice.scan), session, progress)


def _run(ctx: AppContext, baseline, followup, settings: RegistrationSettings) -> None:
    """Both scans prepared, registered and compared; the result (or one error line) into the session state."""
    state = st.session_state
    state.pop("followup_error", None)
    folder = ctx.work / "followup" / str(next(_RUNS))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with st.status("Comparing baseline and follow-up…", expanded=True) as box:
            sides = [_prepare_side(ctx, c, t) for c, t in ((baseline, "baseline"), (followup, "follow-up"))]
            if None in sides:
                return
            b, f = sides
            box.update(label="Registering the follow-up onto the baseline (rigid, then thin-plate spline)…")
            report = register(b, f, folder / "registration", settings)
            from registration.transform import load_transform

            transform = load_transform(report["outputs"]["transform"])
            box.update(label="Warping the follow-up onto the baseline's grid…")
            warped_ct, warped_labels = warped_followup(b, f, transform)
            rows = comparison_rows(b, f, report, transform, _THRESHOLDS)
            box.update(label="Compared", state="complete", expanded=False)
    except (InputError, OSError) as exc:
        state["followup_error"] = str(exc)
        state.pop("followup_result", None)
        return
    views = {name: to_ras(np.asanyarray(side.volume.image.dataobj), side.volume.affine) for name, side in
             (("baseline", b), ("followup", f))}
    state["followup_result"] = {
        "baseline": b, "followup": f, "report": report, "rows": rows, "folder": folder, "token": folder.name,
        "ct": {k: v[0] for k, v in views.items()}, "spacing": {k: v[1] for k, v in views.items()},
        "labels": {"baseline": to_ras(b.labels, b.volume.affine)[0], "followup": to_ras(f.labels, f.volume.affine)[0]},
        "warped_ct": to_ras(warped_ct, b.volume.affine)[0], "warped_labels": to_ras(warped_labels, b.volume.affine)[0]}


def page(ctx: AppContext, display: Display) -> None:
    """The follow-up page: both scans and the registration options in the sidebar, the comparison in the main area."""
    with st.sidebar:
        baseline = pick_scan(ctx, "baseline", "Baseline")
        followup = pick_scan(ctx, "followup", "Follow-up")
        settings = _settings()
        ready = baseline is not None and followup is not None
        go = st.button("Compare", type="primary", disabled=not ready, key="followup_run", width="stretch")
    if go and ready:
        _run(ctx, baseline, followup, settings)
    if st.session_state.get("followup_error"):
        st.error(st.session_state["followup_error"])
    shown = st.session_state.get("followup_result")
    if shown is None:
        st.info("Choose the baseline and the follow-up in the sidebar (each with its segmentation if you have one), "
                "then press **Compare**.")
        return
    _show(shown, display)


def _summary(report: dict) -> None:
    """The registration's figures (registration.json) as metrics, its provenance warnings as lines."""
    r, d = report["rigid"], report["deformable"]
    items = [("rotation", f"{r['rotation_angle_deg']:.2f}°"),
             ("translation", f"{np.linalg.norm(r['translation_mm']):.1f} mm"),
             ("matched structures", str(r["n_matched"])), ("rigid outliers", str(r["n_outliers"]))]
    if d:
        items += [("TPS control points", str(d["n_control_points"])),
                  ("max TPS shift", f"{d['displacement_mm_max']:.1f} mm"),
                  ("folding", f"{100 * d['jacobian']['fraction_nonpositive']:.2g} %")]
    for col, (label, value) in zip(st.columns(len(items)), items, strict=True):
        col.metric(label, value)
    for m in report["provenance"]["mismatches"]:
        st.warning(f"warning: {m['message']}")


def _show(shown: dict, display: Display) -> None:
    """Sources, the registration's summary, the three views, the table and the downloads."""
    b, f = shown["baseline"], shown["followup"]
    for title, side in (("baseline", b), ("follow-up", f)):
        st.markdown(f"**{title}: {side.choice.scan.name}** — {side.source}")
        for line in side.messages:
            st.warning(line)
    _summary(shown["report"])
    tab_side, tab_reg, tab_table = st.tabs(["Side by side", "Registered follow-up over baseline", "Table"])
    with tab_side:
        side_by_side(f"fu_side_{shown['token']}",
                     ("baseline", shown["ct"]["baseline"], shown["labels"]["baseline"], shown["spacing"]["baseline"],
                      b.names),
                     ("follow-up", shown["ct"]["followup"], shown["labels"]["followup"], shown["spacing"]["followup"],
                      f.names), b.names, display.window, display.alpha)
    with tab_reg:
        registered(f"fu_reg_{shown['token']}", shown["ct"]["baseline"], shown["warped_ct"], shown["labels"]["baseline"],
                   shown["warped_labels"], shown["spacing"]["baseline"], display.window)
    with tab_table:
        _table(shown)


def _table(shown: dict) -> None:
    """The per-structure table with the user's thresholds, and the downloads."""
    c1, c2, c3 = st.columns(3)
    thresholds = Thresholds(
        c1.number_input("flag a volume change from (%)", min_value=0.0, value=_THRESHOLDS.volume_pct, step=1.0,
                        key="thr_volume"),
        c2.number_input("flag a mean HU change from (HU)", min_value=0.0, value=_THRESHOLDS.hu, step=5.0, key="thr_hu"),
        c3.number_input("flag a residual from (mm)", min_value=0.0, value=_THRESHOLDS.residual_mm, step=1.0,
                        key="thr_residual"))
    rows = reflag(shown["rows"], thresholds)
    csv_path, json_path = write_comparison(rows, shown["folder"], thresholds, shown["baseline"], shown["followup"],
                                           shown["report"])
    n = sum(1 for r in rows if r["flagged"])
    st.markdown(f"**{n} of {len(rows)} structures flagged** (volumes from each scan's label map on its own grid; "
                "residuals: centroid distances after registration, in the baseline's frame)")
    st.dataframe(rows, column_config=COLUMNS, hide_index=True)
    outputs = shown["report"]["outputs"]
    files = [("transform.json", Path(outputs["transform"])), ("registration.json", Path(outputs["registration"])),
             ("comparison.csv", csv_path), ("comparison.json", json_path)]
    if "overlay" in outputs:
        files.append(("overlay.png", Path(outputs["overlay"])))
    for col, (name, path) in zip(st.columns(len(files)), files, strict=True):
        col.download_button(f"Download {name}", path.read_bytes(), file_name=name, key=f"fu_dl_{name}_{shown['token']}",
                            width="stretch")
