"""Compare results with a reference: one row per (scan, method), then summaries per method and per size class.

Times are seconds; throughput is Mvoxel/s (scan voxels / median total / 1e6); Dice and voxel agreement are
fractions 0..1. Masks are compared in world space (common.imaging.mask_io.align_to_grid). Peak memory is each result's
per-scan "peak_rss_bytes"; the RSS ratio is method / reference on the same scan. Scans are grouped into size
classes by their sliding-window tile count (common.inference.tile_count.TILE_BANDS). The rows form a long pandas table
(``rows_frame``): the summaries are its groupbys, the stage means a pivot of the results' scans.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from common.core.machine import library_versions
from common.core.text import utc_now
from common.imaging.mask_io import LabelMap, MaskCache, align_to_grid, find_ground_truth, resolve_mask
from common.inference.tile_count import TILE_BANDS, task297_geometry, tile_band, tiles_for_geometry
from common.records.metrics import (
    class_voxel_counts,
    dice_buckets,
    dice_per_class,
    latency_stats,
    organ_difference,
    quantiles,
    voxel_agreement,
)
from common.records.results import STAGES, scan_voxels, summarize
from common.reporting.comparison_doc import (
    STANDIN_WARNING,
    ComparisonDoc,
    GroundTruth,
    GroundTruthDice,
    MethodSummary,
    Models,
    Reference,
    Row,
    SizeClass,
)
from common.reporting.comparison_inputs import Entry, input_warnings, provenance, structure_names

ROW_COLUMNS = tuple(f.name for f in fields(Row))


def _median(rec: dict | None) -> dict | None:
    if rec is None or rec.get("status") != "ok":
        return None
    return rec.get("median") or None


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: Iterable[float | None]) -> float | None:
    vals = _finite(values)
    return float(np.mean(vals)) if vals else None


def _median_of(values: Iterable[float | None]) -> float | None:
    vals = _finite(values)
    return float(np.median(vals)) if vals else None


# ---------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class _ReferenceScan:
    """The reference's side of one scan: its result, record, median timings, mask and labels present."""

    entry: Entry
    rec: dict | None
    median: dict | None
    mask: LabelMap | None  # None: no mask to load
    labels: set[int] | None


@dataclass(frozen=True)
class _Agreement:
    """A mask against the reference's or the ground truth's (Dice: label id -> Dice)."""

    voxel_agreement: float | None = None
    dice: dict[int, float] | None = None
    mean_dice: float | None = None
    error: str | None = None
    reoriented: str | None = None


def _labels_of(mask: LabelMap | None, rec: dict | None) -> set[int] | None:
    if mask is not None and mask.ok:
        return set(class_voxel_counts(mask.data))
    if rec is not None and rec.get("status") == "ok" and rec.get("labels_present"):
        return {int(x) for x in rec["labels_present"]}
    return None


def _agreement(target: LabelMap, mask: LabelMap, what: str, with_voxels: bool) -> _Agreement:
    """``mask`` against ``target`` (the reference's mask or the ground truth) on ``target``'s grid."""
    aligned, problem, reoriented = align_to_grid(target.data.shape, target.affine, mask.data, mask.affine, what)
    if aligned is None:
        return _Agreement(error=problem, reoriented=reoriented)
    dice = dice_per_class(target.data, aligned)
    return _Agreement(voxel_agreement=voxel_agreement(target.data, aligned) if with_voxels else None, dice=dice,
                      mean_dice=_mean(list(dice.values())), reoriented=reoriented)


def _pair_with_reference(rec: dict, is_ref: bool, ref: _ReferenceScan, mask: LabelMap | None) -> _Agreement:
    if rec["status"] != "ok":
        return _Agreement()  # the failure itself is shown in status/error
    if is_ref:
        if mask is not None and not mask.ok:
            return _Agreement(error=mask.problem)
        return _Agreement(error=None if rec.get("mask") else "no mask recorded in the result")
    if ref.rec is None or ref.rec.get("status") != "ok":
        return _Agreement(error="the reference failed on this scan")
    if not rec.get("mask"):
        return _Agreement(error="no mask recorded in the result")
    if not mask.ok:
        return _Agreement(error=mask.problem)
    if ref.mask is None:
        return _Agreement(error="the reference recorded no mask for this scan")
    if not ref.mask.ok:
        return _Agreement(error=f"reference mask: {ref.mask.problem}")
    return _agreement(ref.mask, mask, "reference", with_voxels=True)


def _with_ground_truth(rec: dict, mask: LabelMap | None, gt: LabelMap | None) -> _Agreement:
    if gt is None or not gt.ok or rec["status"] != "ok":
        return _Agreement()
    if mask is None or not mask.ok:
        return _Agreement(error="no usable mask to compare")
    return _agreement(gt, mask, "ground truth", with_voxels=False)


def _rss(rec: dict | None) -> int | None:
    if rec is None or rec.get("status") != "ok":
        return None
    v = rec.get("peak_rss_bytes")
    return int(v) if isinstance(v, int | float) and v > 0 else None


def _tiles(rec: dict | None, ref_rec: dict | None) -> tuple[int | None, str | None]:
    """(tile count, where it came from): the method's record, the reference's, else estimated from the
    header with the Task 297 geometry (results written before tile counts were recorded)."""
    for r, source in ((rec, "result"), (ref_rec, "reference")):
        if r is not None and isinstance(r.get("n_tiles"), int) and r["n_tiles"] > 0:
            return int(r["n_tiles"]), source
    for r in (rec, ref_rec):
        if r is not None and r.get("status") == "ok" and all(int(v) > 0 for v in r.get("shape", [0])[:3]):
            try:
                n = tiles_for_geometry(r["shape"], r["spacing_mm"], orientation=r.get("orientation", "RAS"),
                                       **task297_geometry())
                return n, "estimated"
            except (ValueError, TypeError, KeyError):
                return None, None
    return None, None


def build_row(e: Entry, rec: dict, ref: _ReferenceScan, gt: LabelMap | None, cache: MaskCache,
              names: Mapping[int, str]) -> Row:
    """The row of ``e``'s record ``rec`` of one scan, against the reference's side of that scan and ``gt``."""
    is_ref = e is ref.entry
    med = _median(rec)
    ok = rec["status"] == "ok"
    mask = None
    if ok and rec.get("mask"):
        mask = ref.mask if is_ref else cache.get(resolve_mask(rec["mask"], e.path))
    pair = _pair_with_reference(rec, is_ref, ref, mask)
    truth = _with_ground_truth(rec, mask, gt)
    own_labels = ref.labels if is_ref else _labels_of(mask, rec)
    diff = organ_difference(ref.labels, own_labels, names) if ref.labels is not None and own_labels is not None \
        else None
    n_tiles, tiles_source = _tiles(rec, ref.rec)
    # the size class is the scan's, at the reference's tiling (a method with a finer tile step runs more tiles)
    class_tiles = _tiles(ref.rec, None)[0] if ref.rec is not None else None
    own_rss, ref_rss = _rss(rec), _rss(ref.rec)
    return Row(
        scan_id=rec["scan_id"], method=e.label, is_reference=is_ref, status=rec["status"], error=rec.get("error"),
        voxels=scan_voxels(rec),
        median_total_s=med["total_s"] if med else None,
        min_total_s=med["min_total_s"] if med else None,
        max_total_s=med["max_total_s"] if med else None,
        repeats=med["n"] if med else 0,
        stages=dict(med["stages"]) if med else {},
        ref_median_total_s=ref.median["total_s"] if ref.median else None,
        speedup=ref.median["total_s"] / med["total_s"] if med and ref.median and med["total_s"] > 0 else None,
        voxel_agreement=pair.voxel_agreement, dice=pair.dice, mean_dice=pair.mean_dice,
        n_classes_ref=None if ref.labels is None else len(ref.labels - {0}),
        n_classes=None if own_labels is None else len(own_labels - {0}),
        missing=diff["missing"] if diff else None, extra=diff["extra"] if diff else None,
        gt_dice=truth.dice, gt_mean_dice=truth.mean_dice,
        pair_error=pair.error, gt_error=truth.error, reoriented=pair.reoriented, gt_reoriented=truth.reoriented,
        inference_s_per_tile=rec.get("inference_s_per_tile") if ok else None,
        efficiency=rec.get("efficiency") if ok else None,
        n_tiles=n_tiles, n_tiles_source=tiles_source,
        size_class=tile_band(class_tiles if class_tiles is not None else n_tiles),
        peak_rss_bytes=own_rss, peak_rss_method=rec.get("peak_rss_method") if own_rss else None,
        ref_peak_rss_bytes=ref_rss, rss_ratio=(own_rss / ref_rss) if own_rss and ref_rss else None,
    )


# ----------------------------------------------------------------------------------------- summaries


def rows_frame(rows: Sequence[Row]) -> pd.DataFrame:
    """The rows as a long table, one line per (scan, method), columns as Row's fields. Object dtype: values keep
    their Python types (None where missing), so that summaries equal those of the rows themselves."""
    return pd.DataFrame([[getattr(r, c) for c in ROW_COLUMNS] for r in rows], columns=list(ROW_COLUMNS),
                        dtype=object)


def size_classes(frame: pd.DataFrame) -> list[SizeClass]:
    """Per size class (tile band, in TILE_BANDS order) and method (in row order): scans, median speedup, median
    peak RSS and median RSS ratio vs the reference (over the scans of that class where the figure exists)."""
    if frame.empty:
        return []
    keys = frame.assign(size_class=pd.Categorical(frame["size_class"], categories=TILE_BANDS),
                        method=pd.Categorical(frame["method"], categories=list(dict.fromkeys(frame["method"]))))
    out = []
    for (size_class, label), sel in keys.groupby(["size_class", "method"], observed=True, sort=True):
        tiles = [t for t in sel["n_tiles"] if t]
        out.append(SizeClass(
            size_class=size_class, method=label, is_reference=bool(sel["is_reference"].iloc[0]),
            n_scans=len(sel), n_ok=int((sel["status"] == "ok").sum()),
            tiles_min=min(tiles) if tiles else None, tiles_max=max(tiles) if tiles else None,
            median_speedup=_median_of(sel["speedup"]), median_total_s=_median_of(sel["median_total_s"]),
            median_peak_rss_bytes=_median_of(sel["peak_rss_bytes"]), median_rss_ratio=_median_of(sel["rss_ratio"]),
        ))
    return out


def stage_means(entries: Sequence[Entry]) -> pd.DataFrame:
    """Mean over each result's ok scans of the per-scan median seconds per stage: a pivot, index the entries'
    labels, columns the stages (STAGES order) that any result timed; NaN where a result did not time one."""
    long = pd.DataFrame([(e.label, name, s["median"]["stages"][name]) for e in entries for s in e.result["scans"]
                         if _median(s) for name in STAGES if name in s["median"]["stages"]],
                        columns=["method", "stage", "seconds"])
    labels = [e.label for e in entries]
    if long.empty:
        return pd.DataFrame(index=labels, columns=[], dtype=float)
    table = long.pivot_table(index="method", columns="stage", values="seconds", sort=False,
                             aggfunc=lambda s: float(np.mean(s.tolist())))
    return table.reindex(index=labels, columns=[s for s in STAGES if s in table.columns])


def method_summary(e: Entry, is_ref: bool, rows: pd.DataFrame, stages: pd.Series, with_gt: bool) -> MethodSummary:
    """``e`` over all its scans (counts, latency, throughput, stage means ``stages``) and over its ``rows``
    (speedup, agreement and memory vs the reference)."""
    res = e.result
    summ = summarize({"scans": res["scans"]})  # recomputed from the scans, never trusted from the file
    totals = [s["median"]["total_s"] for s in res["scans"] if _median(s)]
    compared = rows[rows["speedup"].notna()]
    ref_total = sum(compared["ref_median_total_s"].tolist())
    own_total = sum(compared["median_total_s"].tolist())
    pooled = [d for dice in rows["dice"] if dice for d in dice.values()]
    gt_pooled = [d for dice in rows["gt_dice"] if dice for d in dice.values()]
    rss = [v for v in rows["peak_rss_bytes"] if v]
    return MethodSummary(
        method=e.method, script=res["script"], is_reference=is_ref,
        weights=e.model.get("weights"), sha256=e.model.get("sha256"),
        n_scans=summ["n_scans"], n_ok=summ["n_ok"], n_failed=summ["n_failed"], success_rate=summ["success_rate"],
        latency=latency_stats(totals), throughput_mvox_s=summ["throughput_mvox_s"],
        stages_mean_s={k: float(v) for k, v in stages.items() if pd.notna(v)},
        total_mean_s=_mean(totals),
        n_compared=len(compared),
        speedup_total=(ref_total / own_total) if own_total > 0 else None,
        speedup_median=float(np.median(compared["speedup"].tolist())) if len(compared) else None,
        mean_voxel_agreement=None if is_ref else _mean(rows["voxel_agreement"]),
        mean_dice=None if is_ref else _mean(rows["mean_dice"]),
        dice_buckets=None if is_ref else dice_buckets(pooled),
        n_dice=0 if is_ref else len(pooled),
        median_peak_rss_bytes=_median_of(rows["peak_rss_bytes"]),
        max_peak_rss_bytes=max(rss, default=None),
        median_rss_ratio=None if is_ref else _median_of(rows["rss_ratio"]),
        ground_truth=GroundTruthDice(quantiles(gt_pooled), _mean(gt_pooled), dice_buckets(gt_pooled),
                                     len(gt_pooled)) if with_gt else None,
        arithmetic=(res.get("arithmetic") or {}).get("label") or "exact",
        limit=_limit(res.get("efficiency")), approximation=res.get("approximation"),
    )


def _limit(eff: dict | None) -> dict | None:
    """The compute limit of a result's "efficiency" record (older records: the float32 torch.mm GEMM peak)."""
    if not eff or not eff.get("limit_s_per_tile"):
        return None
    peak = eff.get("peak_gflops") or eff.get("gemm_peak_gflops")
    return {"precision": eff.get("precision", "float32"), "peak_gflops": peak,
            "limit_s_per_tile": eff["limit_s_per_tile"],
            "source": eff.get("limit_source") or "measured: torch.mm float32 GEMM (older record)"}


# --------------------------------------------------------------------------------------------- compare


def _row_notes(rows: Sequence[Row]) -> list[str]:
    notes = []
    for r in rows:
        if r.pair_error:
            notes.append(f"{r.scan_id} / {r.method}: {r.pair_error}")
        if r.reoriented:
            notes.append(f"{r.scan_id} / {r.method}: mask stored in another axis order than the reference's, "
                         f"compared voxel by voxel in world space after reorienting it ({r.reoriented})")
        if r.gt_error:
            notes.append(f"{r.scan_id} / {r.method} vs ground truth: {r.gt_error}")
    return notes


def compare(entries: Sequence[Entry], reference: Entry, gt_dir: Path | None = None,
            notes: Sequence[str] = ()) -> ComparisonDoc:
    """Compare every result with ``reference`` (and with ground truth in ``gt_dir`` when given).

    Returns the comparison document (no plots yet): inputs, warnings, notes, per scan x method rows and
    per-method summaries. Problems with single pairs (missing or mismatched masks) are recorded in
    the rows' pair_error/gt_error and in notes, never raised.
    """
    notes = list(notes)
    entries = [reference] + [e for e in entries if e is not reference]
    names = structure_names(entries, reference)
    warns, standin, same_weights = input_warnings(entries)
    scan_ids = list(dict.fromkeys([*reference.scans, *(s for e in entries for s in e.scans)]))
    for e in entries[1:]:
        only = [s for s in e.scans if s not in reference.scans]
        if only:
            notes.append(f"{e.label}: scan(s) {', '.join(only)} not in the reference {reference.label}; "
                         "they count in its latency summary but are not compared.")
    gt_found: list[str] = []
    gt_missing: list[str] = []
    rows: list[Row] = []
    cache = MaskCache()
    for sid in scan_ids:
        cache.clear()
        ref_rec = reference.scans.get(sid)
        ref_mask = None
        if ref_rec is not None and ref_rec.get("status") == "ok" and ref_rec.get("mask"):
            ref_mask = cache.get(resolve_mask(ref_rec["mask"], reference.path))
        ref = _ReferenceScan(reference, ref_rec, _median(ref_rec), ref_mask, _labels_of(ref_mask, ref_rec))
        gt = None
        if gt_dir is not None:
            gt_path = find_ground_truth(gt_dir, sid)
            if gt_path is None:
                gt_missing.append(sid)
            else:
                gt_found.append(sid)
                gt = cache.get(gt_path)
                if not gt.ok:
                    notes.append(f"ground truth for {sid}: {gt.problem}")
        for e in entries:
            rec = e.scans.get(sid)
            if rec is None or (ref_rec is None and e is not reference):
                continue
            rows.append(build_row(e, rec, ref, gt, cache, names))
    if gt_dir is not None and gt_missing:
        notes.append(f"no ground truth in {gt_dir} for: {', '.join(gt_missing)}")
    notes += _row_notes(rows)
    frame = rows_frame(rows)
    by_method = dict(tuple(frame.groupby("method", sort=False)))
    stages = stage_means(entries)
    methods = {e.label: method_summary(e, e is reference, by_method.get(e.label, frame.iloc[0:0]),
                                       stages.loc[e.label], gt_dir is not None)
               for e in entries}
    return ComparisonDoc(
        created=utc_now(), machine=reference.result["machine"], versions=reference.result["versions"],
        report_versions=library_versions(),
        reference=Reference(reference.label, reference.method, str(reference.path)),
        inputs=[provenance(e) for e in entries],
        models=Models(standin=standin, same_weights=same_weights,
                      weights=sorted({str(e.model.get("weights")) for e in entries}),
                      sha256=sorted({str(e.model.get("sha256")) for e in entries})),
        warnings=([STANDIN_WARNING.strip("> *")] if standin else []) + warns,
        notes=notes,
        structure_names=dict(sorted(names.items())),
        ground_truth=None if gt_dir is None else GroundTruth(str(gt_dir), gt_found, gt_missing),
        scans=scan_ids, rows=rows, methods=methods, size_classes=size_classes(frame), plots={},
    )
