"""Register two scans from their anatomical passports: rigid (Tier 1) + thin-plate spline (Tier 2).

    python registration/register.py --fixed-passport A.json --moving-passport B.json --out DIR \\
        [--fixed-scan A.nii.gz --moving-scan B.nii.gz] [--no-deformable] [--smoothing X] [--smoothing-factors F ...]
        [--keep-tps] [--allow-mixed-weights]

Writes DIR/transform.json (rigid MOVING -> FIXED world mm + displacement grids in both directions,
see registration/transform.py), DIR/registration.json (timings in ms, per-structure residuals,
outliers, control points, settings, and "tps": whether the spline was kept, the smoothing chosen and the
held-out residuals behind both decisions, registration/validation.py; a dropped spline is a zero field) and, when both scans are given, DIR/overlay.png (fixed scan in
green, moving scan warped onto the fixed grid in magenta: grey where they agree). Both JSON files record
"provenance": each passport's model, weights kind and checkpoint sha256 (registration/provenance.py, which
also gives the rule: a stand-in/official mix is refused without --allow-mixed-weights, other mismatches are
one "warning: ..." line each on stderr).
Bad input: one line naming the file on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from common.cli.args import (
    OneLineParser,
    check_outputs,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    run_script,
)
from common.core.atomic import atomic_path, atomic_write_json
from common.core.errors import InputError
from common.imaging.geometry import fov_bbox_mm
from registration.inputs import FLOOR_HELP, load_checked_passport, load_checked_scan
from registration.options import DeformableOptions, RigidOptions
from registration.provenance import check_inputs, warning_lines

_RIGID_DEFAULTS, _DEFORMABLE_DEFAULTS = RigidOptions(), DeformableOptions()  # the CLI defaults: one source


def build_parser() -> argparse.ArgumentParser:
    """The command line (errors: one line, exit 2)."""
    p = OneLineParser(
        prog="python registration/register.py",
        description="Register a MOVING scan to a FIXED scan from their anatomical passports (JSON made by "
                    "common/records/passport.py): weighted robust rigid alignment of structure centroids and principal "
                    "axes, then a regularised thin-plate spline on matched boundary points. The transform maps "
                    "moving world mm -> fixed world mm (RAS+); the stored displacement grid also gives the "
                    "fixed -> moving direction used to resample moving images onto the fixed grid.",
        epilog="Outputs in --out: transform.json, registration.json, overlay.png (only with both scans).")
    p.add_argument("--fixed-passport", required=True, type=Path, metavar="A.json", help="passport of the fixed scan")
    p.add_argument("--moving-passport", required=True, type=Path, metavar="B.json", help="passport of the moving scan")
    p.add_argument("--fixed-scan", type=Path, metavar="A.nii.gz",
                   help="fixed scan (NIfTI or DICOM folder), for the overlay and the deformable grid extent")
    p.add_argument("--moving-scan", type=Path, metavar="B.nii.gz", help="moving scan, warped onto the fixed grid")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--no-deformable", action="store_true", help="rigid only (skip the thin-plate spline)")
    p.add_argument("--smoothing", type=nonnegative_float, default=_DEFORMABLE_DEFAULTS.smoothing,
                   help="thin-plate spline smoothing (RBFInterpolator units per matched point; larger = smoother): "
                        "the centre of the candidates that cross-validation chooses from. Default: %(default)g")
    p.add_argument("--smoothing-factors", type=positive_float, nargs="+", metavar="F",
                   default=list(_DEFORMABLE_DEFAULTS.smoothing_factors),
                   help="smoothing candidates as multiples of --smoothing, chosen by k-fold cross-validation on "
                        "held-out matches (1 alone: --smoothing as given). Default: %(default)s")
    p.add_argument("--keep-tps", action="store_true",
                   help="keep the thin-plate spline even where held-out matches say it does not beat the rigid "
                        "result (by default it is then dropped and the registration stays rigid)")
    p.add_argument("--residual-threshold", type=positive_float, default=_RIGID_DEFAULTS.residual_threshold_mm,
                   metavar="MM",
                   help="rigid: centroid residual (mm) above which a structure is an outlier. Default: %(default)g")
    p.add_argument("--max-control-points", type=nonnegative_int, default=_DEFORMABLE_DEFAULTS.max_control_points,
                   metavar="N",
                   help=f"thin-plate spline control points (cells + centroids); {FLOOR_HELP}. "
                        "Default: %(default)d")
    p.add_argument("--allow-mixed-weights", action="store_true",
                   help="register passports made with stand-in and official weights (refused otherwise); "
                        "warned and recorded in both JSON files")
    return p


def _normalise(img: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Scale to 0..1 with ``window`` (e.g. HU) or, when None, the 1st..99th percentiles."""
    lo, hi = window if window is not None else (np.percentile(img, [1, 99]) if img.size else (0.0, 1.0))
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def save_overlay(fixed: np.ndarray, warped: np.ndarray, spacing: tuple[float, ...], target: Path,
                 title: str = "") -> Path:
    """Three orthogonal slices through the centre of the (x, y, z) fixed grid: fixed in green, warped
    moving in magenta (grey where both agree). ``spacing``: voxel size in mm for the aspect ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # CT (air at about -1000 HU): soft-tissue window; anything else: percentiles
    window = (-200.0, 300.0) if fixed.size and float(np.min(fixed)) <= -500 else None
    f, m = _normalise(fixed.astype(np.float32), window), _normalise(warped.astype(np.float32), window)
    cx, cy, cz = (s // 2 for s in fixed.shape[:3])
    views = [(f"axial (z = {cz})", f[:, :, cz], m[:, :, cz], spacing[1] / spacing[0]),
             (f"coronal (y = {cy})", f[:, cy, :], m[:, cy, :], spacing[2] / spacing[0]),
             (f"sagittal (x = {cx})", f[cx, :, :], m[cx, :, :], spacing[2] / spacing[1])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, a, b, aspect) in zip(axes, views, strict=True):
        rgb = np.stack([b.T, a.T, b.T], axis=-1)  # R = moving, G = fixed, B = moving -> magenta/green
        ax.imshow(rgb, origin="lower", aspect=aspect)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title or "fixed (green) vs warped moving (magenta)")
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return target


def run(args: argparse.Namespace) -> dict[str, Any]:
    from registration.transform import warp_image
    from registration.two_tier import TierError, register_passports

    if (args.fixed_scan is None) != (args.moving_scan is None):
        missing = "--moving-scan" if args.moving_scan is None else "--fixed-scan"
        raise InputError(args.fixed_scan or args.moving_scan, f"an overlay needs both scans: {missing} is missing")
    fixed_p = load_checked_passport(args.fixed_passport)
    moving_p = load_checked_passport(args.moving_passport)
    provenance = check_inputs(fixed_p, args.fixed_passport, moving_p, args.moving_passport,
                              allow_mixed_weights=args.allow_mixed_weights)  # a refused mix: before any work
    for line in warning_lines(provenance):
        print(line, file=sys.stderr)
    fixed_vol = moving_vol = None
    if args.fixed_scan is not None:
        fixed_vol = load_checked_scan(args.fixed_scan)
        moving_vol = load_checked_scan(args.moving_scan)

    # the deformable grid also covers the fixed scan's field of view (world mm), else its passport's grid
    if fixed_vol is not None:
        bbox = fov_bbox_mm(fixed_vol.shape, fixed_vol.affine)
    else:
        bbox = fov_bbox_mm(tuple(fixed_p.grid.shape), np.asarray(fixed_p.grid.affine, dtype=np.float64))
    rigid_options = RigidOptions(residual_threshold_mm=args.residual_threshold)
    deformable_options = None if args.no_deformable else DeformableOptions(
        smoothing=args.smoothing, max_control_points=args.max_control_points, bbox_mm=bbox,
        smoothing_factors=tuple(args.smoothing_factors), validate=not args.keep_tps)

    t0 = time.perf_counter()
    try:
        rigid, defo, transform = register_passports(fixed_p, moving_p, rigid_options, deformable_options, meta={
            "fixed_passport": str(args.fixed_passport), "moving_passport": str(args.moving_passport),
            "fixed_scan": str(args.fixed_scan) if args.fixed_scan else None,
            "moving_scan": str(args.moving_scan) if args.moving_scan else None,
        })
    except TierError as exc:
        if exc.tier == "rigid":
            raise InputError(args.moving_passport, f"{exc} (fixed passport {args.fixed_passport})") from None
        # e.g. all control points in one plane
        reason = " ".join(str(exc).split(". ")[0].split())
        raise InputError(args.fixed_passport, f"the thin-plate spline cannot be fitted on this passport's "
                                              f"points ({reason}; do they all lie in one plane?); "
                                              "use --no-deformable for a rigid registration") from None
    total_ms = (time.perf_counter() - t0) * 1000.0
    transform.provenance = provenance
    transform.save(args.out / "transform.json")
    report: dict[str, Any] = {
        "fixed_passport": str(args.fixed_passport),
        "moving_passport": str(args.moving_passport),
        "provenance": provenance,
        "direction": "transform maps moving world mm -> fixed world mm (RAS+); grids give both directions",
        "time_ms": {"rigid": rigid.time_ms, "deformable": defo.time_ms["total"] if defo else 0.0,
                    "total": total_ms, "deformable_parts": defo.time_ms if defo else {}},
        "rigid": rigid.to_dict(),
        "deformable": defo.to_dict() if defo else None,
        "n_control_points": defo.n_control_points if defo else 0,
        # the deformable tier's check (registration/validation.py): kept or dropped, the smoothing chosen
        "tps": None if defo is None else {"accepted": bool(defo.accepted),
                                          "smoothing_used": defo.settings.get("smoothing_used"),
                                          "validation": defo.validation},
        "settings": {"deformable": not args.no_deformable, "smoothing": args.smoothing,
                     "smoothing_factors": list(args.smoothing_factors), "keep_tps": bool(args.keep_tps),
                     "residual_threshold_mm": args.residual_threshold,
                     "max_control_points": args.max_control_points,
                     # every option that affects the result: RigidOptions(**...) / DeformableOptions(**...)
                     "rigid_options": asdict(rigid_options),
                     "deformable_options": None if deformable_options is None else asdict(deformable_options)},
        "outputs": {"transform": str(args.out / "transform.json")},
    }
    if fixed_vol is not None and moving_vol is not None:
        t1 = time.perf_counter()
        fixed_img = np.asarray(fixed_vol.image.dataobj, dtype=np.float32)
        moving_img = np.asarray(moving_vol.image.dataobj, dtype=np.float32)
        warped = warp_image(moving_img, moving_vol.affine, fixed_img.shape, fixed_vol.affine, transform)
        report["time_ms"]["warp_image"] = (time.perf_counter() - t1) * 1000.0
        save_overlay(fixed_img, warped, fixed_vol.spacing, args.out / "overlay.png",
                     title=f"fixed {args.fixed_scan.name} (green) vs warped {args.moving_scan.name} (magenta)")
        report["outputs"]["overlay"] = str(args.out / "overlay.png")
    atomic_write_json(args.out / "registration.json", report)
    report["outputs"]["registration"] = str(args.out / "registration.json")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_outputs(folders=(args.out,))  # before any work (creates the folder)
        report = run(args)
    except (InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r = report["rigid"]
    line = (f"rigid: {r['rotation_angle_deg']:.2f} deg, |t| {np.linalg.norm(r['translation_mm']):.1f} mm, "
            f"{r['n_matched']} structures, {r['n_outliers']} outliers, {report['time_ms']['rigid']:.1f} ms")
    if report["deformable"]:
        d = report["deformable"]
        kept = "kept" if d["accepted"] else "dropped (held-out matches: no better than rigid)"
        line += (f"; TPS {kept}: smoothing {d['settings']['smoothing_used']:g}, {d['n_control_points']} control "
                 f"points, max |u| {d['displacement_mm_max']:.1f} mm, "
                 f"folding {100 * d['jacobian']['fraction_nonpositive']:.3f} %, {report['time_ms']['deformable']:.0f} ms")
        if d["settings"].get("budget_floor_applied"):
            line += f" (floor applied: {d['settings']['budget_note']})"
    print(line)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
