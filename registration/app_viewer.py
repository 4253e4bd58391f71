"""The clinical app's image widgets: three orthogonal planes with labels over the CT (slice sliders, a structure
picker that highlights one structure and moves the slices to it), one plane of two scans side by side, and the
registered follow-up over the baseline (blend, checkerboard, contours). Pictures come from registration.app_views.

Volumes given here are canonical (x, y, z), RAS+ (registration.app_views.to_ras); ``spacing`` is their voxel size
in mm. Widget keys start with ``key``, which changes with the data shown (new data, fresh sliders).
"""
from __future__ import annotations

import html

import numpy as np
import streamlit as st

from registration import app_views as views

PANEL_PX = 300  # displayed height of one plane: three side by side fit a 1366 x 768 laptop screen


def _slider(key: str, plane: str, shape: tuple[int, ...], start: int, label: str | None = None) -> int:
    """A slice slider along ``plane`` (its state starts at ``start``)."""
    n = int(shape[views.PLANE_AXIS[plane]])
    st.session_state.setdefault(key, int(np.clip(start, 0, n - 1)))
    return st.slider(label or f"{plane} slice", 0, n - 1, key=key)


def _legend(labels2d: list[np.ndarray], names: dict[int, str], highlight: int | None = None) -> None:
    """The structures in the slices shown, each in its overlay colour (the highlighted one in bold)."""
    chips = []
    for name, colour in views.legend(labels2d, names):
        weight = "700" if highlight is not None and names.get(highlight) == name else "400"
        chips.append(f'<span style="display:inline-block;margin:0 10px 4px 0;font-weight:{weight}">'
                     f'<span style="display:inline-block;width:12px;height:12px;border-radius:2px;background:{colour};'
                     f'margin-right:4px;vertical-align:middle"></span>{html.escape(name)}</span>')
    if chips:
        st.markdown('<div style="font-size:0.9rem;line-height:1.4">' + "".join(chips) + "</div>",
                    unsafe_allow_html=True)


def three_planes(key: str, ct: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float],
                 names: dict[int, str], window: tuple[float, float], alpha: float, first: str | None = None) -> None:
    """Axial, coronal and sagittal planes of ``ct`` with ``labels`` over it, sliders, the structure picker
    (``first``: the structure highlighted at first, e.g. from the URL)."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    options = ["all structures"] + [names.get(k, f"label_{k}") for k in present]
    ids: list[int | None] = [None, *present]

    def jump() -> None:
        label = ids[options.index(st.session_state[f"{key}_pick"])]
        centre = views.centre_of(labels, label)
        for plane in views.PLANES:
            st.session_state[f"{key}_{plane}"] = centre[views.PLANE_AXIS[plane]]

    start = first if first in options else options[0]
    st.session_state.setdefault(f"{key}_pick", start)
    pick = st.selectbox("highlight a structure (the slices move to it)", options, key=f"{key}_pick", on_change=jump)
    highlight = ids[options.index(pick)]
    centre = views.centre_of(labels, ids[options.index(start)])  # where the sliders start
    shown = []
    for col, plane in zip(st.columns(3), views.PLANES, strict=True):
        with col:
            index = _slider(f"{key}_{plane}", plane, labels.shape, centre[views.PLANE_AXIS[plane]])
            lab = views.plane_slice(labels, plane, index)
            rgb = views.overlay(views.grey(views.plane_slice(ct, plane, index), window), lab, alpha, highlight)
            st.image(views.to_display(rgb, views.pixel_mm(spacing, plane), PANEL_PX, plane),
                     caption=f"{plane} slice {index} (0–{labels.shape[views.PLANE_AXIS[plane]] - 1})")
            shown.append(lab)
    _legend(shown, names, highlight)


def side_by_side(key: str, left: tuple, right: tuple, names: dict[int, str], window: tuple[float, float],
                 alpha: float) -> None:
    """One plane of two scans, each (title, ct, labels, spacing, names) with its own slider."""
    plane = st.radio("plane", views.PLANES, horizontal=True, key=f"{key}_plane")
    for col, (title, ct, labels, spacing, own_names) in zip(st.columns(2), (left, right), strict=True):
        with col:
            centre = views.centre_of(labels)
            index = _slider(f"{key}_{title}_{plane}", plane, labels.shape, centre[views.PLANE_AXIS[plane]],
                            f"{title}: {plane} slice")
            lab = views.plane_slice(labels, plane, index)
            rgb = views.overlay(views.grey(views.plane_slice(ct, plane, index), window), lab, alpha)
            st.image(views.to_display(rgb, views.pixel_mm(spacing, plane), PANEL_PX, plane), width=PANEL_PX + 80,
                     caption=f"{title}: {plane} slice {index} (0–{labels.shape[views.PLANE_AXIS[plane]] - 1})")
            _legend([lab], own_names)


def registered(key: str, baseline_ct: np.ndarray, warped_ct: np.ndarray, baseline_labels: np.ndarray,
               warped_labels: np.ndarray, spacing: tuple[float, float, float], window: tuple[float, float]) -> None:
    """The registered follow-up over the baseline, on the baseline's grid: blended, in a checkerboard, or the label
    contours of both (baseline green, follow-up magenta, white where they agree)."""
    c1, c2, c3 = st.columns(3)
    plane = c1.radio("plane", views.PLANES, horizontal=True, key=f"{key}_plane")
    how = c2.radio("show", ["blend", "checkerboard", "contours"], horizontal=True, key=f"{key}_how")
    if how == "blend":
        amount = c3.slider("follow-up weight", 0.0, 1.0, 0.5, 0.05, key=f"{key}_weight")
    elif how == "checkerboard":
        amount = c3.slider("square (pixels of the scan)", 2, 32, 8, key=f"{key}_square")
    index = _slider(f"{key}_{plane}", plane, baseline_labels.shape,
                    views.centre_of(baseline_labels)[views.PLANE_AXIS[plane]])
    base = views.grey(views.plane_slice(baseline_ct, plane, index), window)
    warped = views.grey(views.plane_slice(warped_ct, plane, index), window)
    if how == "blend":
        rgb, what = views.blend(base, warped, amount), f"baseline {1 - amount:.0%} + registered follow-up {amount:.0%}"
    elif how == "checkerboard":
        rgb, what = views.checkerboard(base, warped, amount), "squares alternate baseline / registered follow-up"
    else:
        rgb = views.contours(base, views.plane_slice(baseline_labels, plane, index),
                             views.plane_slice(warped_labels, plane, index))
        what = "label contours: baseline green, registered follow-up magenta, white where equal"
    last = baseline_labels.shape[views.PLANE_AXIS[plane]] - 1
    st.image(views.to_display(rgb, views.pixel_mm(spacing, plane), PANEL_PX + 120, plane), width=PANEL_PX + 200,
             caption=f"baseline grid, {plane} slice {index} (0–{last}): {what}")
