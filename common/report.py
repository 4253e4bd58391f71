"""Compare benchmark results (ts-bench-result files) against a reference: JSON, Markdown tables and PNG plots.

Times are seconds; throughput is Mvoxel/s (scan voxels / median total / 1e6); Dice and voxel agreement are
fractions 0..1 (agreement is shown in % in Markdown). Label maps are nibabel arrays, (x, y, z); two maps are
compared voxel by voxel in world space, one reoriented (axes permuted/flipped) onto the other's grid when their
grids differ only in axis order and direction (``align_to_grid``).
Peak memory is each result's per-scan "peak_rss_bytes" (shown in GiB); the RSS ratio is method / reference on
the same scan. Scans are grouped into size classes by their sliding-window tile count (common.tiles.TILE_BANDS).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import nibabel.orientations as nio
import numpy as np

from common.atomic import atomic_path, atomic_write_json, atomic_write_text
from common.errors import InputError
from common.machine import library_versions
from common.metrics import (
    DICE_BUCKETS,
    class_voxel_counts,
    dice_buckets,
    dice_per_class,
    label_name,
    latency_stats,
    organ_difference,
    quantiles,
    voxel_agreement,
)
from common.results import STAGES, one_line, read_result, scan_voxels, summarize, utc_now
from common.tiles import TILE_BANDS, task297_geometry, tile_band, tiles_for_geometry
from common.volume import check_declared_size

COMPARISON_SCHEMA = "ts-bench-comparison"
COMPARISON_VERSION = 1
REFERENCE_METHOD = "official_pytorch"
DEFAULT_RESULT_FILES = ("03_vanilla.json", "04_onnx.json", "05_optimized.json", "06_inference.json")
GROUND_TRUTH_PATTERNS = ("{}.nii.gz", "{}_labels.nii.gz", "{}_seg.nii.gz", "{}.nii", "{}_labels.nii", "{}_seg.nii")
STANDIN_WARNING = ("> **Stand-in weights (seeded random, exact Task 297 architecture): timings and pipeline "
                   "agreement are real; anatomical accuracy is NOT.**")
PLOT_FILES = {
    "latency": "comparison_latency.png",
    "stages": "comparison_stages.png",
    "dice": "comparison_dice.png",
    "dice_ground_truth": "comparison_dice_ground_truth.png",
}
AFFINE_TOL_MM = 1e-3  # grids are equal when their affines agree this well (mm)
GRID_ANGLE_TOL_DEG = 1e-3


# ----------------------------------------------------------------------------------------- inputs


@dataclass
class Entry:
    """One loaded result file; ``label`` is its unique display name (the method, de-duplicated)."""

    label: str
    path: Path
    result: dict
    scans: dict[str, dict] = field(default_factory=dict)  # scan_id -> scan record

    @property
    def method(self) -> str:
        return self.result["method"]

    @property
    def model(self) -> dict:
        return self.result["model"]


def load_entries(paths: Sequence[str | Path]) -> list[Entry]:
    """Read result files (InputError on a bad one); give each a unique label (method, or method#2 ...)."""
    entries: list[Entry] = []
    seen_paths: set[Path] = set()
    for p in paths:
        path = Path(p)
        if path.resolve() in seen_paths:
            continue
        seen_paths.add(path.resolve())
        res = read_result(path)
        label = res["method"]
        taken = {e.label for e in entries}
        n = 2
        while label in taken:
            label = f"{res['method']}#{n}"
            n += 1
        scans: dict[str, dict] = {}
        for rec in res["scans"]:
            scans.setdefault(rec["scan_id"], rec)
        entries.append(Entry(label, path, res, scans))
    return entries


def choose_reference(entries: Sequence[Entry], spec: str | None = None) -> Entry:
    """The reference entry: ``spec`` names a result file, a method or a label; by default the first result whose
    method is "official_pytorch", else the first result. Raises InputError when ``spec`` matches nothing."""
    if spec:
        for e in entries:
            if spec in (e.label, e.method) or _same_file(e.path, spec):
                return e
        raise InputError(spec, "reference is neither one of the result files nor a method among them "
                               f"({', '.join(e.label for e in entries)})")
    for e in entries:
        if e.method == REFERENCE_METHOD:
            return e
    return entries[0]


def _same_file(a: Path, b: str | Path) -> bool:
    try:
        return Path(b).exists() and a.resolve() == Path(b).resolve()
    except OSError:
        return False


def find_ground_truth(gt_dir: Path, scan_id: str) -> Path | None:
    """Ground-truth label map for ``scan_id`` in ``gt_dir``: <id>.nii.gz, <id>_labels.nii.gz or <id>_seg.nii.gz."""
    for pattern in GROUND_TRUTH_PATTERNS:
        cand = gt_dir / pattern.format(scan_id)
        if cand.is_file():
            return cand
    return None


def resolve_mask(mask: str, result_path: Path) -> Path:
    """A result's mask path: absolute, or relative to the working folder, the result's folder or its parent."""
    p = Path(mask)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), result_path.parent, result_path.parent.parent):
        if (base / p).exists():
            return base / p
    return p


def load_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load an integer label map (x, y, z) and its affine (voxel -> RAS+ mm). InputError when unusable."""
    if not path.is_file():
        raise InputError(path, "label map not found")
    try:
        img = nib.load(str(path))  # header only: the data are read below, after the size check
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"not a readable NIfTI label map ({type(exc).__name__}: {exc})") from exc
    check_declared_size(path, img)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI label map ({type(exc).__name__}: {exc})") from exc
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise InputError(path, "label map holds non-integer values")
        data = rounded.astype(np.int32)
    elif not np.issubdtype(data.dtype, np.integer):
        raise InputError(path, f"label map has non-integer dtype {data.dtype}")
    if data.ndim != 3:
        raise InputError(path, f"label map is {data.ndim}-D, expected 3-D (x, y, z)")
    if data.size and data.min() < 0:
        raise InputError(path, "label map holds negative labels")
    return data, np.asarray(img.affine, dtype=np.float64)


def _grid_difference(shape_a, aff_a: np.ndarray, shape_b, aff_b: np.ndarray) -> str:
    """What differs between two voxel grids of the same axis order (one line): shape, spacing (mm), origin offset
    (mm, world distance of the centres of voxel (0, 0, 0)), direction (degrees); else the largest voxel-centre
    distance (mm)."""
    parts = []
    if tuple(shape_a) != tuple(shape_b):
        parts.append(f"shape {_fmt_vec(shape_b, 'd')} vs {_fmt_vec(shape_a, 'd')}")
    sp_a, sp_b = np.linalg.norm(aff_a[:3, :3], axis=0), np.linalg.norm(aff_b[:3, :3], axis=0)
    if not np.allclose(sp_a, sp_b, atol=AFFINE_TOL_MM, rtol=0):
        parts.append(f"spacing {_fmt_vec(sp_b)} vs {_fmt_vec(sp_a)} mm")
    offset = float(np.linalg.norm(aff_b[:3, 3] - aff_a[:3, 3]))
    if offset > AFFINE_TOL_MM:
        parts.append(f"origin {offset:.4g} mm apart")
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.sum((aff_a[:3, :3] / sp_a) * (aff_b[:3, :3] / sp_b), axis=0)
    angle = float(np.degrees(np.arccos(np.clip(np.nan_to_num(cos), -1.0, 1.0))).max())
    if angle > GRID_ANGLE_TOL_DEG:
        parts.append(f"direction {angle:.3g}° apart")
    if not parts:
        corners = np.array(np.meshgrid(*[(0, max(int(s) - 1, 0)) for s in shape_a], indexing="ij")).reshape(3, -1)
        far = np.abs((aff_b[:3, :3] - aff_a[:3, :3]) @ corners + (aff_b[:3, 3:] - aff_a[:3, 3:])).max()
        parts.append(f"voxel centres up to {far:.4g} mm apart")
    return "; ".join(parts)


def _fmt_vec(values, fmt: str = ".4g") -> str:
    return "x".join(format(float(v) if fmt != "d" else int(v), fmt) for v in values)


def align_to_grid(ref_shape, ref_aff: np.ndarray, data: np.ndarray, aff: np.ndarray,
                  what: str) -> tuple[np.ndarray | None, str | None, str | None]:
    """``data`` (x, y, z, affine ``aff``) on the grid of the ``what``'s (``ref_shape``, ``ref_aff``) for a
    voxel-by-voxel comparison in world space: (array, None, None) when the grids are equal (affines within
    AFFINE_TOL_MM); (contiguous copy with axes permuted/flipped, None, "LAS -> LPS") when they are equal up to axis
    order and direction (nibabel.orientations); else (None, one-line problem naming what differs, None). The
    array's dtype is kept (no float copy)."""
    if tuple(data.shape) == tuple(ref_shape) and np.allclose(aff, ref_aff, atol=AFFINE_TOL_MM, rtol=0):
        return data, None, None
    try:
        own, ref = nio.io_orientation(aff), nio.io_orientation(ref_aff)
        transform = nio.ornt_transform(own, ref)
    except (ValueError, np.linalg.LinAlgError):  # an axis that maps to no world axis, NaN in an affine
        return None, f"mask grid cannot be matched to the {what}'s: singular or non-finite affine", None
    own_codes, ref_codes = ("".join(nio.ornt2axcodes(o)) for o in (own, ref))
    view = nio.apply_orientation(data, transform)  # flips and a transpose: views, nothing copied yet
    new_aff = aff @ nio.inv_ornt_aff(transform, data.shape)
    if view.shape == tuple(ref_shape) and np.allclose(new_aff, ref_aff, atol=AFFINE_TOL_MM, rtol=0):
        return np.ascontiguousarray(view), None, f"{own_codes} -> {ref_codes}"
    reoriented = f"; mask reoriented {own_codes} -> {ref_codes}" if own_codes != ref_codes else ""
    return None, (f"mask grid differs from the {what}'s (mask vs {what}, in the {what}'s axis order{reoriented}): "
                  + _grid_difference(ref_shape, ref_aff, view.shape, new_aff)), None


def structure_names(entries: Sequence[Entry], reference: Entry) -> dict[int, str]:
    """Label id -> structure name: the reference model's "labels", another result's, else TotalSegmentator's
    "total" class map when the model is a TotalSegmentator total model; unknown ids become "label_<n>"."""
    for e in [reference, *entries]:
        labels = e.model.get("labels")
        if isinstance(labels, dict) and labels:
            out = {}
            for k, v in labels.items():
                try:
                    out[int(k)] = str(v)
                except (TypeError, ValueError):
                    continue
            if out:
                return out
    name = str(reference.model.get("name", "")).lower()
    if "297" in name or "total" in name:
        try:
            from totalsegmentator.map_to_binary import class_map

            return {int(k): str(v) for k, v in class_map["total"].items()}
        except Exception:  # optional: names are cosmetic
            pass
    return {}


# ------------------------------------------------------------------------------------------ compare


def _median(rec: dict | None) -> dict | None:
    if rec is None or rec.get("status") != "ok":
        return None
    return rec.get("median") or None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _provenance(e: Entry) -> dict:
    r = e.result
    return {
        "label": e.label, "method": e.method, "script": r["script"], "file": str(e.path), "created": r["created"],
        "model": {k: r["model"].get(k) for k in ("name", "weights", "sha256")},
        "machine": r["machine"], "versions": r["versions"], "settings": r["settings"],
    }


def _warnings(entries: Sequence[Entry]) -> tuple[list[str], bool, bool]:
    """(warnings, any stand-in, all same weights)."""
    warns: list[str] = []
    standin = any(e.model.get("weights") == "standin" for e in entries)
    ids = {(e.model.get("name"), e.model.get("weights"), e.model.get("sha256")) for e in entries}
    same = len(ids) == 1
    if not same:
        desc = "; ".join(f"{e.label}: {e.model.get('weights')} {str(e.model.get('sha256'))[:12]}" for e in entries)
        warns.append(f"Results used different model weights ({desc}): Dice and voxel agreement between "
                     "different weights compare different networks, not pipelines, and are meaningless.")
    if any(e.model.get("sha256") is None for e in entries):
        warns.append("Some results do not record the sha256 of their weights; identical weights cannot be confirmed.")
    machines = {(e.result["machine"].get("cpu_model"), e.result["machine"].get("usable_cores")) for e in entries}
    if len(machines) > 1:
        warns.append("Results come from different machines (CPU model or usable cores differ): "
                     "timings and speedups are not comparable.")
    return warns, standin, same


class _MaskCache:
    """Loads each label map once per scan; remembers load errors."""

    def __init__(self) -> None:
        self._store: dict[Path, tuple[np.ndarray, np.ndarray] | str] = {}

    def get(self, path: Path) -> tuple[np.ndarray, np.ndarray] | str:
        if path not in self._store:
            try:
                self._store[path] = load_label_map(path)
            except InputError as exc:
                self._store[path] = str(exc)
        return self._store[path]

    def clear(self) -> None:
        self._store.clear()


def compare(entries: Sequence[Entry], reference: Entry, gt_dir: Path | None = None,
            notes: Sequence[str] = ()) -> dict:
    """Compare every result with ``reference`` (and with ground truth in ``gt_dir`` when given).

    Returns the comparison document (schema "ts-bench-comparison"): inputs, warnings, notes, per scan x method
    rows and per-method summaries. Problems with single pairs (missing or mismatched masks) are recorded in the
    rows' "pair_error"/"gt_error" and in notes, never raised.
    """
    notes = list(notes)
    entries = [reference] + [e for e in entries if e is not reference]
    names = structure_names(entries, reference)
    warns, standin, same_weights = _warnings(entries)
    ref_ids = list(reference.scans)
    scan_ids = ref_ids + [s for e in entries for s in e.scans if s not in reference.scans]
    scan_ids = list(dict.fromkeys(scan_ids))
    for e in entries[1:]:
        only = [s for s in e.scans if s not in reference.scans]
        if only:
            notes.append(f"{e.label}: scan(s) {', '.join(only)} not in the reference {reference.label}; "
                         "they count in its latency summary but are not compared.")
    gt_found: list[str] = []
    gt_missing: list[str] = []
    rows: list[dict] = []
    cache = _MaskCache()
    for sid in scan_ids:
        cache.clear()
        ref_rec = reference.scans.get(sid)
        ref_med = _median(ref_rec)
        ref_mask = None
        if ref_rec is not None and ref_rec.get("status") == "ok" and ref_rec.get("mask"):
            ref_mask = cache.get(resolve_mask(ref_rec["mask"], reference.path))
        gt = None
        if gt_dir is not None:
            gt_path = find_ground_truth(gt_dir, sid)
            if gt_path is None:
                gt_missing.append(sid)
            else:
                gt_found.append(sid)
                gt = cache.get(gt_path)
                if isinstance(gt, str):
                    notes.append(f"ground truth for {sid}: {gt}")
        for e in entries:
            rec = e.scans.get(sid)
            if rec is None or (ref_rec is None and e is not reference):
                continue
            rows.append(_row(e, rec, e is reference, ref_rec, ref_med, ref_mask, gt, cache, names))
    if gt_dir is not None and gt_missing:
        notes.append(f"no ground truth in {gt_dir} for: {', '.join(gt_missing)}")
    for r in rows:
        if r["pair_error"]:
            notes.append(f"{r['scan_id']} / {r['method']}: {r['pair_error']}")
        if r["reoriented"]:
            notes.append(f"{r['scan_id']} / {r['method']}: mask stored in another axis order than the reference's, "
                         f"compared voxel by voxel in world space after reorienting it ({r['reoriented']})")
        if r.get("gt_error"):
            notes.append(f"{r['scan_id']} / {r['method']} vs ground truth: {r['gt_error']}")
    methods = {e.label: _method_summary(e, e is reference, [r for r in rows if r["method"] == e.label],
                                        gt_dir is not None)
               for e in entries}
    doc = {
        "schema": COMPARISON_SCHEMA,
        "schema_version": COMPARISON_VERSION,
        "created": utc_now(),
        "machine": reference.result["machine"],
        "versions": reference.result["versions"],
        "report_versions": library_versions(),
        "reference": {"label": reference.label, "method": reference.method, "file": str(reference.path)},
        "inputs": [_provenance(e) for e in entries],
        "models": {
            "standin": standin,
            "same_weights": same_weights,
            "weights": sorted({str(e.model.get("weights")) for e in entries}),
            "sha256": sorted({str(e.model.get("sha256")) for e in entries}),
        },
        "warnings": ([STANDIN_WARNING.strip("> *")] if standin else []) + warns,
        "notes": notes,
        "structure_names": {str(k): v for k, v in sorted(names.items())},
        "ground_truth": None if gt_dir is None else {"dir": str(gt_dir), "found": gt_found, "missing": gt_missing},
        "scans": scan_ids,
        "rows": rows,
        "methods": methods,
        "size_classes": size_classes(rows),
        "plots": {},
    }
    return doc


def _labels_of(mask: tuple[np.ndarray, np.ndarray] | str | None, rec: dict | None) -> set[int] | None:
    if isinstance(mask, tuple):
        return set(class_voxel_counts(mask[0]))
    if rec is not None and rec.get("status") == "ok" and rec.get("labels_present"):
        return {int(x) for x in rec["labels_present"]}
    return None


def _row(e: Entry, rec: dict, is_ref: bool, ref_rec: dict | None, ref_med: dict | None,
         ref_mask, gt, cache: _MaskCache, names: Mapping[int, str]) -> dict:
    med = _median(rec)
    row: dict[str, Any] = {
        "scan_id": rec["scan_id"], "method": e.label, "is_reference": is_ref,
        "status": rec["status"], "error": rec.get("error"),
        "voxels": scan_voxels(rec),
        "median_total_s": med["total_s"] if med else None,
        "min_total_s": med["min_total_s"] if med else None,
        "max_total_s": med["max_total_s"] if med else None,
        "repeats": med["n"] if med else 0,
        "stages": dict(med["stages"]) if med else {},
        "ref_median_total_s": ref_med["total_s"] if ref_med else None,
        "speedup": None, "voxel_agreement": None, "dice": None, "mean_dice": None,
        "n_classes_ref": None, "n_classes": None, "missing": None, "extra": None,
        "gt_dice": None, "gt_mean_dice": None, "pair_error": None, "gt_error": None,
        "reoriented": None, "gt_reoriented": None,
        **_size_and_memory(rec, ref_rec),
    }
    if med and ref_med and med["total_s"] > 0:
        row["speedup"] = ref_med["total_s"] / med["total_s"]
    mask = None
    if rec["status"] == "ok" and rec.get("mask"):
        mask = ref_mask if is_ref else cache.get(resolve_mask(rec["mask"], e.path))
    # pair with the reference
    if rec["status"] != "ok":
        row["pair_error"] = None  # the failure itself is shown in status/error
    elif is_ref:
        if isinstance(mask, str):
            row["pair_error"] = mask
        elif not rec.get("mask"):
            row["pair_error"] = "no mask recorded in the result"
    elif ref_rec is None or ref_rec.get("status") != "ok":
        row["pair_error"] = "the reference failed on this scan"
    elif not rec.get("mask"):
        row["pair_error"] = "no mask recorded in the result"
    elif isinstance(mask, str):
        row["pair_error"] = mask
    elif ref_mask is None:
        row["pair_error"] = "the reference recorded no mask for this scan"
    elif isinstance(ref_mask, str):
        row["pair_error"] = f"reference mask: {ref_mask}"
    else:
        aligned, row["pair_error"], row["reoriented"] = align_to_grid(ref_mask[0].shape, ref_mask[1], *mask,
                                                                      "reference")
        if aligned is not None:
            dice = dice_per_class(ref_mask[0], aligned)
            row["dice"] = {str(k): v for k, v in dice.items()}
            row["mean_dice"] = _mean(list(dice.values()))
            row["voxel_agreement"] = voxel_agreement(ref_mask[0], aligned)
    ref_labels = _labels_of(ref_mask, ref_rec)
    own_labels = _labels_of(mask, rec)
    if ref_labels is not None:
        row["n_classes_ref"] = len(ref_labels - {0})
    if own_labels is not None:
        row["n_classes"] = len(own_labels - {0})
    if ref_labels is not None and own_labels is not None:
        diff = organ_difference(ref_labels, own_labels, names)
        row["missing"], row["extra"] = diff["missing"], diff["extra"]
    # ground truth
    if gt is not None and not isinstance(gt, str) and rec["status"] == "ok":
        if isinstance(mask, tuple):
            aligned, row["gt_error"], row["gt_reoriented"] = align_to_grid(gt[0].shape, gt[1], *mask, "ground truth")
            if aligned is not None:
                gd = dice_per_class(gt[0], aligned)
                row["gt_dice"] = {str(k): v for k, v in gd.items()}
                row["gt_mean_dice"] = _mean(list(gd.values()))
        else:
            row["gt_error"] = "no usable mask to compare"
    return row


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


def _size_and_memory(rec: dict, ref_rec: dict | None) -> dict:
    n_tiles, tiles_source = _tiles(rec, ref_rec)
    # the size class is the scan's, at the reference's tiling (a method with a finer tile step runs more tiles)
    class_tiles = _tiles(ref_rec, None)[0] if ref_rec is not None else None
    own, ref = _rss(rec), _rss(ref_rec)
    per_tile, eff = rec.get("inference_s_per_tile"), rec.get("efficiency")
    return {"inference_s_per_tile": per_tile if rec.get("status") == "ok" else None,
            "efficiency": eff if rec.get("status") == "ok" else None,
            "n_tiles": n_tiles, "n_tiles_source": tiles_source,
            "size_class": tile_band(class_tiles if class_tiles is not None else n_tiles),
            "peak_rss_bytes": own, "peak_rss_method": rec.get("peak_rss_method") if own else None,
            "ref_peak_rss_bytes": ref, "rss_ratio": (own / ref) if own and ref else None}


def _median_of(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else None


def size_classes(rows: Sequence[dict]) -> list[dict]:
    """Per size class (tile band) and method: scans, median speedup, median peak RSS and median RSS ratio
    vs the reference (over the scans of that class where the figure exists)."""
    out = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for band in TILE_BANDS:
        for m in methods:
            sel = [r for r in rows if r["size_class"] == band and r["method"] == m]
            if not sel:
                continue
            tiles = [r["n_tiles"] for r in sel if r["n_tiles"]]
            out.append({
                "size_class": band, "method": m, "is_reference": bool(sel[0]["is_reference"]),
                "n_scans": len(sel), "n_ok": sum(r["status"] == "ok" for r in sel),
                "tiles_min": min(tiles) if tiles else None, "tiles_max": max(tiles) if tiles else None,
                "median_speedup": _median_of([r["speedup"] for r in sel]),
                "median_total_s": _median_of([r["median_total_s"] for r in sel]),
                "median_peak_rss_bytes": _median_of([r["peak_rss_bytes"] for r in sel]),
                "median_rss_ratio": _median_of([r["rss_ratio"] for r in sel]),
            })
    return out


def _method_summary(e: Entry, is_ref: bool, rows: list[dict], with_gt: bool) -> dict:
    res = e.result
    summ = summarize({"scans": res["scans"]})  # recomputed from the scans, never trusted from the file
    ok = [s for s in res["scans"] if _median(s)]
    stages_mean = {}
    for name in STAGES:
        vals = [s["median"]["stages"][name] for s in ok if name in s["median"]["stages"]]
        if vals:
            stages_mean[name] = float(np.mean(vals))
    total_mean = _mean([s["median"]["total_s"] for s in ok])
    compared = [r for r in rows if r["speedup"] is not None]
    ref_total = sum(r["ref_median_total_s"] for r in compared)
    own_total = sum(r["median_total_s"] for r in compared)
    pooled = [d for r in rows if r["dice"] for d in r["dice"].values()]
    gt_pooled = [d for r in rows if r["gt_dice"] for d in r["gt_dice"].values()]
    out = {
        "method": e.method, "script": res["script"], "is_reference": is_ref,
        "weights": e.model.get("weights"), "sha256": e.model.get("sha256"),
        "n_scans": summ["n_scans"], "n_ok": summ["n_ok"], "n_failed": summ["n_failed"],
        "success_rate": summ["success_rate"],
        "latency": latency_stats([s["median"]["total_s"] for s in ok]),
        "throughput_mvox_s": summ["throughput_mvox_s"],
        "stages_mean_s": stages_mean,
        "total_mean_s": total_mean,
        "n_compared": len(compared),
        "speedup_total": (ref_total / own_total) if own_total > 0 else None,
        "speedup_median": float(np.median([r["speedup"] for r in compared])) if compared else None,
        "mean_voxel_agreement": _mean([r["voxel_agreement"] for r in rows if not is_ref]),
        "mean_dice": _mean([r["mean_dice"] for r in rows if not is_ref]),
        "dice_buckets": None if is_ref else dice_buckets(pooled),
        "n_dice": 0 if is_ref else len(pooled),
        "median_peak_rss_bytes": _median_of([r["peak_rss_bytes"] for r in rows]),
        "max_peak_rss_bytes": max((r["peak_rss_bytes"] for r in rows if r["peak_rss_bytes"]), default=None),
        "median_rss_ratio": None if is_ref else _median_of([r["rss_ratio"] for r in rows]),
    }
    if with_gt:
        out["gt_dice_quantiles"] = quantiles(gt_pooled)
        out["gt_mean_dice"] = _mean(gt_pooled)
        out["gt_dice_buckets"] = dice_buckets(gt_pooled)
        out["n_gt_dice"] = len(gt_pooled)
    return out


# ----------------------------------------------------------------------------------------- markdown


def fmt_s(x: float | None) -> str:
    """Seconds: 3 decimals below 1 s, 2 below 100 s, else 1."""
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_rate(x: float | None) -> str:
    """Mvoxel/s: 3 decimals, 3 significant digits below 0.01."""
    return "—" if x is None else f"{x:.3f}" if x >= 0.01 else f"{x:.3g}"


def fmt_speedup(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def fmt_gib(n_bytes: float | None) -> str:
    """Bytes as GiB with 2 decimals."""
    return "—" if n_bytes is None else f"{n_bytes / 2**30:.2f}"


def fmt_ratio(x: float | None) -> str:
    """A ratio such as the RSS of a method / the reference's, as a percentage without decimals."""
    return "—" if x is None else f"{100 * x:.0f} %"


def fmt_pct(frac: float | None) -> str:
    """A fraction 0..1 as a percentage with 3 decimals."""
    return "—" if frac is None else f"{100 * frac:.3f}"


def fmt_dice(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _names_cell(names: list[str] | None, limit: int = 4) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column (l/r/c)."""
    align = align or "l" * len(header)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_esc(h) for h in header) + " |",
             "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(_esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(doc: dict) -> str:
    """The Markdown report of a comparison document (first line: the stand-in warning when it applies)."""
    out: list[str] = []
    if doc["models"]["standin"]:
        out += [STANDIN_WARNING, ">"]
    for w in doc["warnings"]:
        if not w.startswith("Stand-in weights"):
            out += [f"> **{w}**", ">"]
    if out:
        out[-1] = ""
    ref = doc["reference"]
    out += ["# TotalSegmentator fast model: vanilla vs optimized", "",
            f"Generated {doc['created']} by 07_compare_vanilla_vs_optimized.py. "
            f"Reference: **{ref['label']}** (`{ref['file']}`). Speedup = reference median latency / method median "
            "latency on the same scan; voxel agreement and Dice compare each method's mask with the reference's.", ""]
    m0 = doc["machine"]
    out += [f"Machine (reference run): {m0.get('cpu_model')}, {m0.get('usable_cores')} usable of "
            f"{m0.get('logical_cores')} logical cores, {m0.get('ram_gib')} GiB RAM, {m0.get('os')}.", ""]

    out += ["## Inputs", ""]
    out.append(md_table(
        ["Method", "Script", "File", "Model", "Weights", "sha256", "Created"],
        [[i["label"], i["script"], f"`{i['file']}`", i["model"]["name"], i["model"]["weights"],
          (str(i["model"]["sha256"])[:12] if i["model"]["sha256"] else "—"), i["created"]] for i in doc["inputs"]]))
    out.append("")

    out += ["## Summary per method", ""]
    rows = []
    for label, m in doc["methods"].items():
        lat = m["latency"]
        b = m["dice_buckets"]
        rows.append([
            label + (" (reference)" if m["is_reference"] else ""),
            f"{m['n_ok']}/{m['n_scans']}",
            "—" if m["success_rate"] is None else f"{100 * m['success_rate']:.1f} %",
            f"{fmt_s(lat['mean'])} / {fmt_s(lat['median'])} / {fmt_s(lat['p95'])}",
            fmt_rate(m["throughput_mvox_s"]),
            fmt_speedup(m["speedup_total"]),
            fmt_pct(m["mean_voxel_agreement"]),
            fmt_dice(m["mean_dice"]),
            "—" if not b or not m["n_dice"] else " / ".join(str(b[k]) for k in DICE_BUCKETS),
        ])
    out.append(md_table(
        ["Method", "Scans ok/total", "Success", "Latency mean / median / p95 (s)", "Throughput (Mvox/s)",
         "Speedup (total time)", "Voxel agreement % (mean)", "Mean Dice",
         "Dice classes >0.95 / 0.90–0.95 / 0.85–0.90 / <0.85"],
        rows, "lrrrrrrrr"))
    out += ["", "Latency statistics are over the per-scan median totals; throughput = scan voxels / median total. "
            "Speedup (total time) = sum of the reference's median totals / sum of the method's, over the scans both "
            "ran. Mean Dice averages the per-scan mean over classes present in either mask; the buckets count "
            "(scan, class) pairs.", ""]

    out += ["## Per scan", ""]
    rows = []
    for r in doc["rows"]:
        lat = "failed" if r["status"] != "ok" else (
            f"{fmt_s(r['median_total_s'])} [{fmt_s(r['min_total_s'])}–{fmt_s(r['max_total_s'])}]"
            if r["median_total_s"] is not None else "—")
        if r["is_reference"]:
            agree, dice, missing = "(reference)", "(reference)", "—"
        else:
            agree, dice = fmt_pct(r["voxel_agreement"]), fmt_dice(r["mean_dice"])
            missing = "—" if r["missing"] is None else (
                f"missing: {_names_cell(r['missing'])}; extra: {_names_cell(r['extra'])}")
            if r["pair_error"] and r["voxel_agreement"] is None:
                agree = dice = "n/a"
        classes = f"{'—' if r['n_classes_ref'] is None else r['n_classes_ref']} / " \
                  f"{'—' if r['n_classes'] is None else r['n_classes']}"
        rows.append([r["scan_id"], r["method"], lat, fmt_speedup(r["speedup"]), agree, dice, classes, missing])
    out.append(md_table(["Scan", "Method", "Median latency (s) [min–max]", "Speedup vs ref", "Voxel agreement %",
                         "Mean Dice", "Classes ref / method", "Missing / extra"], rows, "llrrrrcl"))
    out.append("")

    out += render_size_and_memory(doc)

    present = [s for s in STAGES if any(s in m["stages_mean_s"] for m in doc["methods"].values())]
    if present:
        out += ["## Stage times (s, mean over scans of the per-scan medians)", ""]
        rows = [[label] + [fmt_s(m["stages_mean_s"].get(s)) for s in present] + [fmt_s(m["total_mean_s"])]
                for label, m in doc["methods"].items()]
        out.append(md_table(["Method", *present, "total"], rows, "l" + "r" * (len(present) + 1)))
        out.append("")

    if doc["ground_truth"] is not None:
        gt = doc["ground_truth"]
        out += ["## Dice vs ground truth", ""]
        if doc["models"]["standin"]:
            out += ["Stand-in weights: these numbers measure nothing anatomical.", ""]
        out.append(f"Ground truth from `{gt['dir']}`: {len(gt['found'])} scan(s) found"
                   + (f", missing for {', '.join(gt['missing'])}" if gt["missing"] else "") + ".")
        out.append("")
        rows = []
        for label, m in doc["methods"].items():
            q = m.get("gt_dice_quantiles") or {}
            rows.append([label, m.get("n_gt_dice", 0), *(fmt_dice(q.get(k)) for k in ("p10", "p25", "p50", "p75", "p90")),
                         fmt_dice(m.get("gt_mean_dice"))])
        out.append(md_table(["Method", "(scan, class) pairs", "p10", "p25", "p50", "p75", "p90", "mean"], rows,
                            "lrrrrrrr"))
        out.append("")

    if doc["plots"]:
        out += ["## Plots", ""]
        for key, name in doc["plots"].items():
            out += [f"![{key}]({name})", ""]

    if doc["notes"]:
        out += ["## Notes", ""]
        out += [f"- {_esc(n)}" for n in doc["notes"]]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_size_and_memory(doc: dict) -> list[str]:
    """Markdown lines: time, peak RSS and tile count per scan, then the summary by size class."""
    rows_in = doc.get("rows") or []
    if not rows_in:
        return []
    out = ["## Time, memory and size per scan", ""]
    rows = []
    for r in rows_in:
        tiles = "—" if r.get("n_tiles") is None else str(r["n_tiles"]) + (
            " (est.)" if r.get("n_tiles_source") == "estimated" else "")
        lat = "failed" if r["status"] != "ok" else fmt_s(r["median_total_s"])
        rows.append([r["scan_id"], tiles, r["method"], lat,
                     "(reference)" if r["is_reference"] else fmt_speedup(r["speedup"]),
                     fmt_gib(r.get("peak_rss_bytes")),
                     "(reference)" if r["is_reference"] else fmt_ratio(r.get("rss_ratio")),
                     "—" if r.get("inference_s_per_tile") is None else f"{r['inference_s_per_tile']:.2f}",
                     "—" if r.get("efficiency") is None else f"{r['efficiency'] * 100:.0f} %"])
    out.append(md_table(["Scan", "Tiles", "Method", "Median latency (s)", "Speedup vs ref", "Peak RSS (GiB)",
                         "RSS vs ref", "Inference s/tile", "Efficiency"], rows, "lrlrrrrrr"))
    out += ["", "Tiles: sliding-window tiles (112x112x128 at 3 mm, step 0.8) of the scan; (est.) = computed from "
            "the header for results that did not record it. Peak RSS: peak resident memory of the work on the "
            "scan, max over its timed runs (ours: this process's VmHWM reset before each run; the official "
            "tool: its isolated worker's, self + children). RSS vs ref = method / reference on the same scan. "
            "Inference s/tile: the inference stage (network + float16 accumulation) per tile; efficiency = the "
            "compute limit per tile (tile FLOPs counted from the ONNX graph / this machine's float32 GEMM peak, "
            "measured by 06 --efficiency) / that time.",
            ""]
    classes = doc.get("size_classes") or []
    if classes:
        out += ["## By size class", ""]
        rows = []
        for c in classes:
            span = "—" if c["tiles_min"] is None else (
                str(c["tiles_min"]) if c["tiles_min"] == c["tiles_max"] else f"{c['tiles_min']}–{c['tiles_max']}")
            rows.append([c["size_class"], c["method"] + (" (reference)" if c["is_reference"] else ""),
                         f"{c['n_ok']}/{c['n_scans']}", span, fmt_s(c["median_total_s"]),
                         "—" if c["is_reference"] else fmt_speedup(c["median_speedup"]),
                         fmt_gib(c["median_peak_rss_bytes"]),
                         "—" if c["is_reference"] else fmt_ratio(c["median_rss_ratio"])])
        out.append(md_table(["Size class", "Method", "Scans ok/total", "Tiles", "Median latency (s)",
                             "Median speedup", "Median peak RSS (GiB)", "Median RSS vs ref"], rows, "llrrrrrr"))
        out.append("")
    return out


# -------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_png(fig, target: Path) -> Path:
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return target


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_latency(doc: dict, target: Path) -> Path | None:
    """Grouped bars: median latency (s) per scan and method, error bars from min to max repeat."""
    labels = list(doc["methods"])
    scans = [s for s in doc["scans"] if any(r["scan_id"] == s and r["median_total_s"] for r in doc["rows"])]
    if not scans:
        return None
    by = {(r["scan_id"], r["method"]): r for r in doc["rows"]}
    fig = _new_figure(max(6.0, 1.2 + len(scans) * (0.5 + 0.35 * len(labels))), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(labels)
    x = np.arange(len(scans))
    vals_all = []
    for i, (label, color) in enumerate(zip(labels, _colors(len(labels)), strict=True)):
        h, lo, hi = [], [], []
        for s in scans:
            r = by.get((s, label))
            med = r["median_total_s"] if r and r["median_total_s"] is not None else np.nan
            h.append(med)
            lo.append(med - r["min_total_s"] if r and r["min_total_s"] is not None else 0.0)
            hi.append(r["max_total_s"] - med if r and r["max_total_s"] is not None else 0.0)
        vals_all += [v for v in h if np.isfinite(v)]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, h, width, yerr=[lo, hi], capsize=3, label=label,
               color=color, edgecolor="black", linewidth=0.4)
    if vals_all and min(vals_all) > 0 and max(vals_all) / min(vals_all) > 50:
        ax.set_yscale("log")
    ax.set_xticks(x, scans, rotation=30 if len(scans) > 4 else 0, ha="right" if len(scans) > 4 else "center")
    ax.set_ylabel("median latency per scan (s)")
    ax.set_title("Latency per scan (bars: median, whiskers: min–max over repeats)")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, target)


def plot_stages(doc: dict, target: Path) -> Path | None:
    """Stacked bars per method: mean over scans of the median seconds per stage, plus unattributed time."""
    labels = [m for m in doc["methods"] if doc["methods"][m]["stages_mean_s"] or doc["methods"][m]["total_mean_s"]]
    if not labels:
        return None
    fig = _new_figure(max(5.5, 1.5 + 1.3 * len(labels)), 4.5)
    ax = fig.add_subplot()
    parts = [*STAGES, "other"]
    colors = dict(zip(parts, _colors(len(parts)), strict=True))
    bottom = np.zeros(len(labels))
    used = set()
    for part in parts:
        vals = []
        for m in labels:
            s = doc["methods"][m]
            if part == "other":
                total = s["total_mean_s"] or 0.0
                vals.append(max(0.0, total - sum(s["stages_mean_s"].values())))
            else:
                vals.append(s["stages_mean_s"].get(part, 0.0))
        vals = np.asarray(vals)
        if not vals.any():
            continue
        used.add(part)
        ax.bar(labels, vals, bottom=bottom, label=part if part != "other" else "other (unattributed)",
               color=colors[part], edgecolor="black", linewidth=0.4)
        bottom += vals
    for i, m in enumerate(labels):
        total = doc["methods"][m]["total_mean_s"]
        if total:
            ax.text(i, bottom[i], f"{fmt_s(total)} s", ha="center", va="bottom", fontsize="small")
    ax.set_ylabel("seconds (mean over scans of per-scan medians)")
    ax.set_title("Where the time goes")
    ax.margins(y=0.1)
    if used:
        ax.legend(fontsize="small", loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, target)


def plot_dice(doc: dict, target: Path, key: str = "dice", title: str = "vs reference") -> Path | None:
    """Per class Dice distribution (box over scans + points), one panel per method; ``key`` is "dice" or
    "gt_dice"."""
    per_method: dict[str, dict[int, list[float]]] = {}
    for r in doc["rows"]:
        if r.get(key):
            d = per_method.setdefault(r["method"], {})
            for lab, v in r[key].items():
                d.setdefault(int(lab), []).append(v)
    if not per_method:
        return None
    classes = sorted({lab for d in per_method.values() for lab in d})
    names = {int(k): v for k, v in doc.get("structure_names", {}).items()}
    width = min(32.0, max(7.0, 2.0 + 0.17 * len(classes)))
    fig = _new_figure(width, 2.6 * len(per_method) + 1.2)
    axes = fig.subplots(len(per_method), 1, squeeze=False, sharex=True)[:, 0]
    rng = np.random.default_rng(0)
    colors = dict(zip(doc["methods"], _colors(len(doc["methods"])), strict=True))
    for ax, (method, d) in zip(axes, per_method.items(), strict=True):
        pos = [i for i, lab in enumerate(classes) if lab in d]
        data = [d[classes[i]] for i in pos]
        ax.boxplot(data, positions=pos, widths=0.6, showfliers=False,
                   medianprops={"color": "black"}, boxprops={"color": colors.get(method, "C0")})
        for p, vals in zip(pos, data, strict=True):
            ax.scatter(p + rng.uniform(-0.15, 0.15, len(vals)), vals, s=8, color=colors.get(method, "C0"),
                       alpha=0.8, zorder=3)
        ax.set_ylim(-0.03, 1.03)
        ax.axhline(0.95, color="grey", lw=0.6, ls="--")
        ax.set_ylabel("Dice")
        ax.set_title(f"{method} {title}", fontsize="medium", loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(classes)), [label_name(c, names) for c in classes], rotation=90,
                        fontsize=7 if len(classes) > 30 else 9)
    axes[-1].set_xlim(-0.7, len(classes) - 0.3)
    fig.suptitle(f"Dice per class {title} (box: spread over scans; dashed line 0.95)")
    return _save_png(fig, target)


# ---------------------------------------------------------------------------------------------- run


def write_report(doc: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the PNG plots, comparison.json and comparison.md into ``out_dir`` (atomically). Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plots = {
        "latency": lambda t: plot_latency(doc, t),
        "stages": lambda t: plot_stages(doc, t),
        "dice": lambda t: plot_dice(doc, t, "dice", "vs reference"),
        "dice_ground_truth": lambda t: plot_dice(doc, t, "gt_dice", "vs ground truth"),
    }
    doc["plots"] = {}
    for key, make in plots.items():
        if key == "dice_ground_truth" and doc["ground_truth"] is None:
            continue
        path = make(out_dir / PLOT_FILES[key])
        if path is not None:
            doc["plots"][key] = PLOT_FILES[key]
            written[key] = path
        else:
            doc["notes"].append(f"plot {PLOT_FILES[key]} not drawn: no data")
    written["json"] = atomic_write_json(out_dir / "comparison.json", doc)
    written["markdown"] = atomic_write_text(out_dir / "comparison.md", render_markdown(doc))
    return written


def default_result_paths(folder: str | Path) -> tuple[list[Path], list[str]]:
    """The default result files present in ``folder`` and notes about the absent ones."""
    folder = Path(folder)
    found, notes = [], []
    for name in DEFAULT_RESULT_FILES:
        p = folder / name
        if p.is_file():
            found.append(p)
        else:
            notes.append(f"{p} not found: skipped (run its script to include it)")
    return found, notes


def run_comparison(result_paths: Sequence[str | Path], out_dir: str | Path, *, reference: str | None = None,
                   ground_truth: str | Path | None = None, notes: Sequence[str] = ()) -> tuple[dict, dict[str, Path]]:
    """Load results, compare with the reference, write the report. InputError on bad inputs."""
    paths = list(result_paths)
    if reference and Path(reference).suffix == ".json" and Path(reference).exists():
        paths = [Path(reference), *paths]
    if not paths:
        raise InputError(None, "no result files to compare (run scripts 03-06 first or pass --results)")
    entries = load_entries(paths)
    ref = choose_reference(entries, reference)
    notes = list(notes)
    if reference is None and ref.method != REFERENCE_METHOD:
        notes.append(f"no result with method {REFERENCE_METHOD!r}: {ref.label} ({ref.path}) is the reference")
    gt_dir = None
    if ground_truth is not None:
        gt_dir = Path(ground_truth)
        if not gt_dir.is_dir():
            raise InputError(gt_dir, "ground-truth folder not found")
    for e in entries:
        for rec in e.result["scans"]:
            if rec["status"] != "ok":
                notes.append(f"{e.label}: {rec['scan_id']} failed: {one_line(rec.get('error') or '')}")
    doc = compare(entries, ref, gt_dir, notes)
    return doc, write_report(doc, out_dir)
