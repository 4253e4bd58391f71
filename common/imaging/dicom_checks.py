"""DICOM input, step 2: the chosen series must form a regular 3-D grid (common.imaging.dicom tells the whole story);
after conversion, a slice whose rescale makes its HU jump against its neighbours' is named in a warning.

Positions are compared along the slice normal (row x column direction cosines of ImageOrientationPatient), with
a tolerance of SPACING_RTOL of the slice step (at least POSITION_ATOL_MM, mm) for rounding in the headers.
"""
from __future__ import annotations

from collections import Counter
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


# ---------------------------------------------------------------------------------------------
# per-slice rescale (a warning only: the HU are what the official tool's dicom2nifti gives)
# ---------------------------------------------------------------------------------------------
RESCALE_JUMP_HU = 100.0  # a rescale difference that moves a slice's HU by less is not worth a warning
RESCALE_SAMPLE = 64  # pixels per in-plane axis compared between adjacent slices
MAX_RESCALE_WARNINGS = 3


def _rescale(ds) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a slice, 1 and 0 when absent (as dicom2nifti's apply_scaling)."""
    slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    return (1.0 if slope in (None, "") else float(slope)), (0.0 if intercept in (None, "") else float(intercept))


def _planes(slices: list, image) -> tuple[int, np.ndarray] | None:
    """(slice axis, plane index of each slice) in the converted ``image`` (x, y, z array; RAS+ affine in mm), from
    each slice's ImagePositionPatient (LPS mm); None when the slices do not map one to one onto its planes."""
    lps = np.asarray([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in slices])
    ras = np.c_[-lps[:, 0], -lps[:, 1], lps[:, 2], np.ones(len(slices))]
    ijk = (np.linalg.inv(np.asarray(image.affine, dtype=np.float64)) @ ras.T).T[:, :3]
    axis = int(np.argmax(np.ptp(ijk, axis=0)))
    index = np.rint(ijk[:, axis]).astype(int)
    n = int(image.shape[axis])
    if len(set(index.tolist())) != len(slices) or index.min() < 0 or index.max() >= n:
        return None
    return axis, index


def check_rescale(slices: list, image, source: Source) -> list[str]:
    """Warnings (one line each, without the source's label) for slices whose RescaleSlope/RescaleIntercept differ
    from their neighbours' in a way that makes their HU jump while their stored values are continuous with the
    neighbours' (an export that wrote one slice's rescale wrong: e.g. intercept 0 among -1024). The HU are
    left as they are (the official tool's dicom2nifti applies each slice's own rescale); only said.

    Cheap: nothing when every slice has the same rescale; else adjacent planes of the converted ``image`` (its
    (x, y, z) array, already in memory) are compared on a RESCALE_SAMPLE^2 subsample: the median absolute HU
    difference with the slice's own rescale against that with its neighbour's (stored values continuous)."""
    try:
        params = [_rescale(ds) for ds in slices]
    except (TypeError, ValueError):  # an unreadable value: dicom2nifti's conversion has said so already
        return []
    if len(set(params)) == 1:
        return []
    mapped = _planes(slices, image)
    if mapped is None:
        return []
    axis, index = mapped
    data = np.asanyarray(image.dataobj)
    order = np.argsort(index)

    def plane(i: int) -> np.ndarray:
        p = np.take(data, int(index[i]), axis=axis)
        return np.asarray(p[:: max(1, p.shape[0] // RESCALE_SAMPLE), :: max(1, p.shape[1] // RESCALE_SAMPLE)],
                          dtype=np.float64)

    theirs = Counter(params).most_common(1)[0][0]
    runs: list[list[int]] = []  # runs of adjacent slices (by position) with one rescale, not the series' own
    for pos, i in enumerate(order):
        if params[i] != theirs:
            if runs and runs[-1][-1] == pos - 1 and params[order[pos - 1]] == params[i]:
                runs[-1].append(pos)
            else:
                runs.append([pos])
    notes = []
    for run in runs:
        sides = [(run[0], run[0] - 1), (run[-1], run[-1] + 1)]
        jumps = [_jump(plane(order[k]), params[order[k]], plane(order[j]), params[order[j]])
                 for k, j in sides if 0 <= j < len(order) and params[order[j]] == theirs]
        if jumps and all(j is not None for j in jumps):
            notes.append(_rescale_note([slices[order[k]] for k in run], [order[k] for k in run], params[order[run[0]]],
                                       theirs, float(np.mean(jumps)), source, order, len(jumps)))
    if len(notes) > MAX_RESCALE_WARNINGS:
        notes = notes[:MAX_RESCALE_WARNINGS] + [f"{len(notes) - MAX_RESCALE_WARNINGS} more runs of slices whose "
                                                "rescale makes their HU jump against their neighbours'; check the export"]
    return notes


def _jump(hu: np.ndarray, own: tuple[float, float], nb_hu: np.ndarray, nb: tuple[float, float]) -> float | None:
    """The HU jump of a slice against its neighbour that their rescales explain (median, HU), or None: the jump
    with the slice's own rescale must be at least RESCALE_JUMP_HU and four times that with the neighbour's."""
    (m, b), (m_nb, b_nb) = own, nb
    if m == 0 or hu.shape != nb_hu.shape:
        return None
    alt = (hu - b) / m * m_nb + b_nb  # the slice's stored values under its neighbour's rescale
    actual, continuous = float(np.median(np.abs(hu - nb_hu))), float(np.median(np.abs(alt - nb_hu)))
    shift = float(np.median(hu - alt))
    if abs(shift) < RESCALE_JUMP_HU or actual < RESCALE_JUMP_HU or continuous > actual / 4:
        return None
    return shift


def _rescale_note(run: list, idx: list[int], own: tuple[float, float], theirs: tuple[float, float], jump: float,
                  source: Source, order: np.ndarray, n_neighbours: int) -> str:
    """One line naming the slices of ``run`` (datasets; ``idx`` their indices in the series) and their rescale
    against that of their ``n_neighbours`` (1 or 2) neighbours."""
    rank = {int(i): p + 1 for p, i in enumerate(order)}  # slice number by position: the converted image's planes
    names = [source.name(Path(ds.filename)) for ds in run]
    inst = [str(ds.get("InstanceNumber", "?")) for ds in run]
    diff = [(k, a, b) for k, a, b in zip(("RescaleSlope", "RescaleIntercept"), own, theirs, strict=True) if a != b]
    what = " and ".join(f"{k} {a:g}" for k, a, _ in diff)
    their = " and ".join(f"{b:g}" for _, _, b in diff)
    n = len(order)
    if len(run) == 1:
        who = f"slice {names[0]} (instance {inst[0]}; slice {rank[idx[0]]} of {n} by position) has"
        whose = "its HU jump"
    else:
        who = (f"{len(run)} adjacent slices {names[0]} ... {names[-1]} (instances {inst[0]}-{inst[-1]}; slices "
               f"{rank[idx[0]]}-{rank[idx[-1]]} of {n} by position) have")
        whose = "their HU jump"
    owner = "its" if len(run) == 1 else "their"
    neighbours = f"{owner} neighbours have" if n_neighbours > 1 else f"{owner} neighbour has"
    against = "theirs" if n_neighbours > 1 else "the neighbour's"
    return f"{who} {what} where {neighbours} {their}: {whose} by {jump:+.0f} against {against}; check the export"
