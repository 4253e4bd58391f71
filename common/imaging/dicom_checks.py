"""DICOM input, step 2: the chosen series must form a regular 3-D grid (common.imaging.dicom tells the whole story).

Positions are compared along the slice normal (row x column direction cosines of ImageOrientationPatient), with
a tolerance of SPACING_RTOL of the slice step (at least POSITION_ATOL_MM, mm) for rounding in the headers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.core.errors import InputError
from common.core.text import fmt_vec
from common.imaging.dicom_series import MIN_SLICES, Series, Source, image_type

SPACING_RTOL = 0.01  # slice steps may differ by 1 % (header rounding) ...
POSITION_ATOL_MM = 0.02  # ... or by this much (positions written with 2 decimals)
ORIENTATION_ATOL = 1e-3  # direction cosines: dicom2nifti's own tolerance for "same orientation"


def check_pixel_data(ds, source: Source) -> None:
    """The deferred PixelData element must be complete: as long as Rows x Columns x samples x bits says, and
    inside the file (a truncated slice file is caught here, before any conversion)."""
    path = Path(ds.filename)
    name = source.name(path)
    element = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    if element is None:
        raise InputError(source.label, f"{name} in the {source.kind} holds no pixel data; truncated or corrupt file")
    length = int(getattr(element, "length", 0) or 0)
    if length == 0xFFFFFFFF:  # encapsulated (compressed): decoding will tell
        return
    expected = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("SamplesPerPixel", 1) or 1)
                * int(ds.get("BitsAllocated", 16) or 16) // 8 * int(ds.get("NumberOfFrames", 1) or 1))
    end = getattr(element, "value_tell", None)
    size = path.stat().st_size
    if length < expected:
        raise InputError(source.label, f"{name} in the {source.kind} has {length} bytes of pixel data, "
                                       f"{expected} expected ({ds.get('Rows')}x{ds.get('Columns')} pixels); corrupt file")
    if end is not None and int(end) + length > size:
        raise InputError(source.label, f"{name} in the {source.kind} is truncated: it ends after "
                                       f"{max(size - int(end), 0)} of its {length} bytes of pixel data")


def drop_localizers(series: Series) -> tuple[list, list[str]]:
    """The slices dicom2nifti keeps: no LOCALIZER image type, and (when orientations differ) only orientations
    with at least MIN_SLICES slices, as its remove_localizers_* do; returns (slices, notes)."""
    kept = [ds for ds in series.datasets if "LOCALIZER" not in image_type(ds)]
    notes = []
    if len(kept) < len(series.datasets):
        notes.append(f"left out {len(series.datasets) - len(kept)} localizer slice(s) of the series")
    groups: list[list] = []
    for ds in kept:
        iop = np.asarray(ds.get("ImageOrientationPatient", [np.nan] * 6), dtype=np.float64)
        for g in groups:
            if np.allclose(iop, np.asarray(g[0].ImageOrientationPatient, dtype=np.float64), atol=ORIENTATION_ATOL):
                g.append(ds)
                break
        else:
            groups.append([ds])
    if len(groups) > 1:
        big = [g for g in groups if len(g) >= MIN_SLICES]
        dropped = sum(len(g) for g in groups) - sum(len(g) for g in big)
        if dropped:
            notes.append(f"left out {dropped} slice(s) in another orientation (localizer)")
        kept = [ds for g in big for ds in g]
    return kept, notes


def check_series(slices: list, source: Source) -> None:
    """InputError (one line) unless ``slices`` (single-frame datasets of one series) form a regular 3D grid:
    same size, pixel spacing and orientation; positions along the slice normal unique and evenly spaced; no
    in-plane drift (gantry tilt); every file's pixel data complete."""
    where, kind = source.label, source.kind
    first = slices[0]
    for ds in slices:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                        "InstanceNumber"):
            if ds.get(keyword, None) in (None, ""):
                raise InputError(where, f"{source.name(Path(ds.filename))} in the {kind} lacks {keyword}; "
                                        "cannot place the slice")
        check_pixel_data(ds, source)
    if len(slices) < MIN_SLICES:
        raise InputError(where, f"the series has only {len(slices)} slice(s); at least {MIN_SLICES} are needed for "
                                "a volume (a scout/localizer?)")
    size0 = (int(first.Rows), int(first.Columns))
    pix0 = np.asarray(first.PixelSpacing, dtype=np.float64)
    iop0 = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    for ds in slices[1:]:
        name = source.name(Path(ds.filename))
        if (int(ds.Rows), int(ds.Columns)) != size0:
            raise InputError(where, f"slices differ in size: {size0[0]}x{size0[1]} pixels in "
                                    f"{source.name(Path(first.filename))}, {ds.Rows}x{ds.Columns} in {name}")
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=np.float64), pix0, rtol=1e-3, atol=1e-4):
            raise InputError(where, f"slices differ in pixel spacing: {fmt_vec(pix0)} mm in "
                                    f"{source.name(Path(first.filename))}, {fmt_vec(ds.PixelSpacing)} mm in {name}")
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop0, atol=ORIENTATION_ATOL):
            raise InputError(where, f"slices differ in orientation: {fmt_vec(iop0)} in "
                                    f"{source.name(Path(first.filename))}, {fmt_vec(ds.ImageOrientationPatient)} in {name}")
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise InputError(where, f"ImageOrientationPatient {fmt_vec(iop0)} is not two orthogonal unit vectors")
    check_positions(slices, normal, source)


def check_positions(slices: list, normal: np.ndarray, source: Source) -> None:
    """Unique, evenly spaced positions along ``normal``; no in-plane drift. Positions z in mm along the normal
    (for an axial series: the patient's z, DICOM LPS, as in ImagePositionPatient)."""
    where = source.label
    pos = np.asarray([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in slices])
    z = pos @ normal
    order = np.argsort(z, kind="stable")
    z, pos = z[order], pos[order]
    names = [source.name(Path(slices[i].filename)) for i in order]
    steps = np.diff(z)
    extent = float(z[-1] - z[0])
    typical = float(np.median(steps))
    tol = max(SPACING_RTOL * abs(typical), POSITION_ATOL_MM)
    same = np.flatnonzero(steps <= tol)
    if same.size:
        i = int(same[0])
        raise InputError(where, f"duplicated slice: {names[i]} and {names[i + 1]} lie at the same position "
                                f"z={z[i]:.2f} mm ({same.size} duplicate(s) in the series)")
    odd = np.flatnonzero(np.abs(steps - typical) > tol)
    if odd.size:
        lo, hi = float(steps.min()), float(steps.max())
        ratio = steps[odd] / typical
        if odd.size < steps.size / 2 and np.all(np.round(ratio) >= 2) and \
                np.all(np.abs(ratio - np.round(ratio)) * typical <= tol):
            i = int(odd[0])
            hint = f"a missing slice between z={z[i]:.2f} and z={z[i + 1]:.2f} mm?"
        else:
            changes = np.flatnonzero(np.abs(np.diff(steps)) > tol)
            if changes.size:
                k = int(changes[0]) + 1
                hint = f"it changes from {steps[k - 1]:.4g} to {steps[k]:.4g} mm at z={z[k]:.2f} mm"
            else:  # a gradual drift
                k = int(odd[0])
                hint = f"{steps[k]:.4g} mm between z={z[k]:.2f} and z={z[k + 1]:.2f} mm, {typical:.4g} mm typical"
        raise InputError(where, f"slice spacing varies from {lo:.4g} to {hi:.4g} mm ({hint}); the slices do not "
                                "form a regular grid")
    inplane = (pos - pos[0]) - np.outer(z - z[0], normal)  # each slice's offset across the normal, mm
    drift = np.linalg.norm(inplane, axis=1)
    limit = max(SPACING_RTOL * extent, POSITION_ATOL_MM)
    if float(drift.max()) > limit:
        expected = np.outer((z - z[0]) / extent, inplane[-1])  # a tilt: offsets grow linearly with z
        if float(np.linalg.norm(inplane - expected, axis=1).max()) <= limit:
            angle = float(np.degrees(np.arctan2(float(drift[-1]), extent)))
            what = f"gantry tilt of {angle:.1f}° (slice positions move {float(drift[-1]):.2f} mm sideways over " \
                   f"{extent:.1f} mm)"
        else:
            what = f"slice positions are shifted sideways by up to {float(drift.max()):.2f} mm (not on one line)"
        raise InputError(where, f"{what}; tilted or sheared series are not supported, resample it to an untilted "
                                "grid first")
