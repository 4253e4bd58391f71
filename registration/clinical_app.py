"""The clinical follow-up app in the browser: two CTs in, organs segmented, registered and compared.

    .venv/bin/streamlit run registration/clinical_app.py [-- --data DIR --out DIR --weights auto|official|standin
                                                          --config FILE --max-upload-mb N]

Started from the project folder it listens on localhost only (.streamlit/config.toml). Two modes:

- Single scan: one scan segmented (totalseg-fast's own per-scan function) or given with the user's own
  segmentation; three planes with the labels over the CT, slice sliders and a structure picker; the structures'
  volume, mean HU and border contact; downloads of the --ml label map, the passport and statistics.json.
- Follow-up: a baseline and a follow-up, each segmented by 06's per-scan job into 06's output folder (its outputs
  reused when up to date: same resume keys) or given with the user's segmentation; registered by
  registration/register.py (rigid, then thin-plate spline); side by side, the registered follow-up over the
  baseline (blend, checkerboard, contours) and the per-structure table (volume and HU change, residual, flags);
  downloads of transform.json, registration.json and the table (CSV, JSON).

Scans come from the data folder (default: ct_data/, as 06 reads it) or uploads, which go to a temporary folder
of the browser session, removed when it ends. The model session is built once per server process. Stand-in
weights are said in a banner on every page. Every bad input is one line, the command lines' message.
"""
from __future__ import annotations

import sys
from pathlib import Path

# streamlit puts this file's folder first on sys.path; the package is imported as registration.*, and the folder's
# bare module names (options, inputs, evaluate, ...) must not shadow installed packages of those names
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if not (p and Path(p).resolve() == _HERE)]

import argparse  # noqa: E402

import streamlit as st  # noqa: E402

from common.core.paths import BENCHMARKS  # noqa: E402
from registration import app_cache  # noqa: E402
from registration.app_inputs import AppContext  # noqa: E402
from registration.app_single import Display  # noqa: E402
from registration.app_views import WINDOWS  # noqa: E402

MODES = {"single": "Single scan", "followup": "Follow-up"}
LOCAL = ("localhost", "127.0.0.1", "::1")
COMPACT = ("<style>[data-testid='stMainBlockContainer']{padding-top:2.5rem;padding-bottom:2rem}"
           "[data-testid='stSidebarHeader']{height:2rem}</style>")  # a laptop screen: the planes above the fold
DEFAULT_UPLOAD_MB = 1024  # a 512 x 512 x 500 int16 CT is 250 MiB uncompressed; .streamlit/config.toml agrees


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The app's own options (after ``--`` on the streamlit command line); ValueError (one line) when bad."""
    p = argparse.ArgumentParser(prog="streamlit run registration/clinical_app.py --", exit_on_error=False,
                                add_help=False)
    p.add_argument("--data", default=None, help="folder of scans to pick from (default: ct_data/, as 06)")
    p.add_argument("--out", default=str(BENCHMARKS / "06_inference"), help="06's output folder (reused)")
    p.add_argument("--weights", choices=["auto", "official", "standin"], default="auto")
    p.add_argument("--config", default=None, help="run configuration JSON (default: 06's choice)")
    p.add_argument("--max-upload-mb", type=int, default=DEFAULT_UPLOAD_MB)
    try:
        args, unknown = p.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise ValueError(f"app options: {exc}") from None
    if unknown:
        raise ValueError(f"app options: unrecognised {' '.join(unknown)}")
    if args.max_upload_mb < 1:
        raise ValueError("app options: --max-upload-mb must be at least 1")
    return args


def _banner(mode: str) -> bool:
    """The weights banner (stand-in: on every page) and the listening warning; False when no weights at all."""
    try:
        spec, notes = app_cache.weights(mode)
    except (RuntimeError, OSError, ValueError) as exc:
        st.error(f"weights: {exc}")
        return False
    st.session_state["weights_notes"] = " ".join(notes)
    if spec.is_standin:
        st.error("**Stand-in weights.** The model's weights are seeded random numbers (the official Task 297 weights "
                 "are not installed here): its segmentations are **not anatomy**. Give your own segmentation for "
                 "clinical figures.", icon="⚠️")
    else:
        st.caption(f"weights: official Task 297 ({spec.checkpoint_sha256[:12]}…)")
    address = st.get_option("server.address")
    if address not in LOCAL:
        st.warning(f"This server listens on {address or 'every network interface'}: start it from the project "
                   "folder (its .streamlit/config.toml says localhost) or add --server.address localhost.")
    return True


def _context(args: argparse.Namespace) -> AppContext:
    """The pages' context: the data folder's scans, 06's folder, this session's folder, the URL's defaults."""
    work = app_cache.session_folder()
    if st.session_state.get("work") != str(work):  # a new session, or one whose folder was released
        for key in ("single_result", "followup_result", "single_error", "followup_error"):
            st.session_state.pop(key, None)
        st.session_state["work"] = str(work)
    batch, label_files, problem = app_cache.data_batch(args.data, args.out)
    if problem:
        st.error(problem)
    params = {k: st.query_params.get(k) for k in st.query_params.keys()}
    return AppContext(batch if batch and batch.scans else None, [Path(p) for p in label_files], Path(args.out), work,
                      args.max_upload_mb, args.weights, args.config, params)


def _sidebar(ctx: AppContext) -> tuple[str, Display]:
    """The mode and the viewer's settings."""
    with st.sidebar:
        st.markdown("### Clinical follow-up")
        keys = list(MODES)
        default = ctx.params.get("mode")
        mode = st.radio("mode", keys, format_func=MODES.get, horizontal=True, key="mode",
                        index=keys.index(default) if default in keys else 0)
        with st.expander("Display"):
            window = st.selectbox("CT window", list(WINDOWS), key="window")
            alpha = st.slider("label opacity", 0.0, 1.0, 0.45, 0.05, key="alpha")
    return mode, Display(WINDOWS[window], alpha, ctx.params.get("structure"))


def _about(ctx: AppContext) -> None:
    """Where things are, for this session."""
    with st.sidebar.expander("About this session"):
        st.caption(f"scans: {ctx.batch.source if ctx.batch else 'none in the data folder; upload one'}")
        st.caption(f"06's outputs (reused, and written for scans of the data folder): {ctx.out06}")
        st.caption(f"uploads and results of this session: {ctx.work} (removed when the session ends); "
                   f"upload limit {ctx.max_upload_mb} MB")
        st.caption(st.session_state.get("weights_notes", ""))
        session = st.session_state.get("model_notes")
        st.caption(session or "model session: built on the first segmentation, once per server process")


def main() -> None:
    st.set_page_config(page_title="Clinical follow-up · TotalSegmentator fast", layout="wide")
    st.markdown(COMPACT, unsafe_allow_html=True)
    try:
        args = parse_args(sys.argv[1:])
    except ValueError as exc:
        st.error(str(exc))
        return
    if not _banner(args.weights):
        return
    ctx = _context(args)
    mode, display = _sidebar(ctx)
    if mode == "single":
        from registration.app_single import page
    else:
        from registration.app_followup import page
    page(ctx, display)
    _about(ctx)


if __name__ == "__main__":
    main()
