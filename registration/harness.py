"""The accuracy harness: registration against KNOWN transforms of a real CT, and passport timing.

The real CT and its label map are the FIXED scan; registration/synthetic.py makes each moving scan from a
known truth psi (MOVING world mm -> FIXED world mm, RAS+). Passports are built from the label maps ONLY
(common.records.passport.compute_structures); the registration never sees the truth. Per case: TRE (mm, see
registration/accuracy.py) for no registration, rigid only and rigid + TPS, Dice of the warped labels
(circular: the same labels drive the registration), Jacobian folding of the deformable field, runtime, and
where the body error sits (``tre_body_worst_structures_mm``: mean TRE per structure, worst first).
Arrays are (x, y, z); affines map voxel (i, j, k) to world mm.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.imaging.geometry import fov_bbox_mm, voxel_to_world
from common.imaging.labels import checked_label_array, total_class_names_if_installed
from common.records.passport import compute_structures
from common.records.passport_model import Structure
from registration.accuracy import (
    BODY_HU,
    dice_scores,
    folding_stats,
    sample_points,
    summarise_cases,
    tre_by_structure,
    tre_table,
)
from registration.breathing import (
    LUNG,
    BreathingField,
    breathing_field,
    label_mask,
    random_breathing_transform,
    region_points,
)
from registration.inputs import load_checked_scan
from registration.options import DeformableOptions, RigidOptions
from registration.rigid import rotation_angle_deg
from registration.structures import centroid
from registration.synthetic import (
    KnownTransform,
    make_moving,
    model_labels,
    random_known_transform,
    synthetic_structures,
)
from registration.transform import Transform, warp_labels
from registration.two_tier import register_passports


def evaluate_case(fixed_img: np.ndarray, anatomy_labels: np.ndarray, affine: np.ndarray, names: dict[int, str],
                  known: KnownTransform, *, fixed_labels: np.ndarray | None = None,
                  fixed_passport: list[Structure] | None = None, label_sigma_vox: float = 1.0, n_points: int = 20000,
                  seed: int = 0, rigid_options: RigidOptions | None = None,
                  deformable_options: DeformableOptions | None = None, with_dice: bool = True) -> dict[str, Any]:
    """Make the moving scan from ``known``, register passports, and measure TRE / Dice / folding / time.

    Arrays (x, y, z), ``affine`` voxel -> world mm RAS+. ``anatomy_labels``: the original label map of
    the fixed CT. Fixed labels (``model_labels``; pass them precomputed as ``fixed_labels``) and moving
    labels are both samples of its smooth anatomy model (``label_sigma_vox``). The deformable grid also
    covers ``bbox_mm`` of ``deformable_options``: when that is None (or no options are given), the fixed
    scan's field of view (run_synthetic sets it once for all its cases).
    """
    rng = np.random.default_rng(seed)
    if fixed_labels is None:
        fixed_labels = model_labels(anatomy_labels, label_sigma_vox)
    m_img, m_lab, m_aff = make_moving(fixed_img, anatomy_labels, affine, known, label_sigma_vox=label_sigma_vox)
    fp = fixed_passport if fixed_passport is not None else compute_structures(fixed_labels, affine, names)
    mp = compute_structures(m_lab, m_aff, names)
    defo_options = deformable_options or DeformableOptions()
    if defo_options.bbox_mm is None:
        defo_options = replace(defo_options, bbox_mm=fov_bbox_mm(fixed_img.shape, affine))
    rigid, defo, T = register_passports(fp, mp, rigid_options, defo_options)
    pts = sample_points(fixed_img, fixed_labels, affine, n_points, rng)
    pts["centroids"] = np.array([centroid(s) for s in fp]).reshape(-1, 3)
    pts.update(region_points(fixed_labels, affine, names, n_points, rng))
    estimates = {"none": Transform.identity(), "rigid": T.rigid_only(), "rigid_tps": T}
    out: dict[str, Any] = {
        "truth": {
            "rotation_deg": rotation_angle_deg(known.rotation),
            "shift_mm_at_centre": None,
            "peak_deformation_mm": float(np.linalg.norm(known.deformation(pts["body"]), axis=1).max())
            if known.deformed else 0.0,
            "max_grad_deformation": known.max_gradient(pts["body"]),
            "det_min_deformation": known.det_min(pts["body"]) if known.deformed else 1.0,
            **({"breathing_cc_mm": known.field.cc_mm, "breathing_ap_mm": known.field.ap_mm}
               if isinstance(known.field, BreathingField) else {}),
        },
        "moving_shape": list(m_lab.shape),
        "n_structures": {"fixed": len(fp), "moving": len(mp), "matched": len(rigid.residuals_mm),
                         "rigid_outliers": list(rigid.outliers)},
        "tre_mm": tre_table(pts, known, estimates),
        # where the body error sits: the structures (label of each body point's voxel) with the largest mean TRE
        "tre_body_worst_structures_mm": tre_by_structure(pts["body"], fixed_labels, affine, names, known, estimates),
        "time_ms": {"rigid": rigid.time_ms, "tps": defo.time_ms["total"] if defo else 0.0,
                    "tps_parts": defo.time_ms if defo else {}},
        "n_control_points": defo.n_control_points if defo else 0,
        "tps_accepted": bool(defo.accepted) if defo else False,
        "tps_validation": defo.validation if defo else None,
        "smoothing_used": defo.settings.get("smoothing_used") if defo else None,
    }
    if defo is not None:
        out["jacobian"] = folding_stats(defo.grid, pts["body"])
        out["icp_history"] = defo.history
    if with_dice:
        labels = np.array([s.label for s in fp])
        out["dice"] = {name: dice_scores(warp_labels(m_lab, m_aff, fixed_labels.shape, affine, est), fixed_labels,
                                         labels) for name, est in estimates.items()}
    return out


def load_ct_and_labels(ct_path: Path, seg_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32 (x,y,z), labels int (x,y,z), affine) after checking that the grids agree.

    Bad files, a label map whose shape or affine differs from the scan's and one with non-integer values raise
    InputError (one line); negative labels are background (0), as in passports.
    """
    from common.imaging.validation import check_label_map_matches

    ct = load_checked_scan(ct_path).image
    seg = load_checked_scan(seg_path, modality="ANY").image
    check_label_map_matches(ct, seg, ct_path, seg_path)
    img = np.asarray(ct.dataobj, dtype=np.float32)
    lab = checked_label_array(np.asarray(seg.dataobj), seg_path, ndim=3, negative_as_background=True)
    return img, lab, np.asarray(ct.affine, dtype=np.float64)


def run_synthetic(ct_path: Path, seg_path: Path, *, magnitudes: tuple[float, ...] = (5.0, 10.0, 20.0),
                  n_cases: int = 3, seed: int = 0, n_points: int = 20000, max_angle_deg: float = 15.0,
                  max_shift_mm: float = 30.0, rigid_options: RigidOptions | None = None,
                  deformable_options: DeformableOptions | None = None, with_dice: bool = True,
                  include_rigid_only: bool = True, include_self: bool = True,
                  label_sigma_vox: float = 1.0, breathing_cases: int | None = None,
                  volume: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Self-registration, rigid-only truths, rigid + deformation truths for each peak magnitude and rigid +
    breathing truths (registration/breathing.py; ``breathing_cases`` of them, default ``n_cases``, 0 for none;
    needs lungs in the label map). ``volume``: (image, labels, affine) already loaded (e.g. a variant made at
    run time; the paths are then only recorded)."""
    img, anatomy, aff = volume if volume is not None else load_ct_and_labels(ct_path, seg_path)
    lab = model_labels(anatomy, label_sigma_vox)  # fixed labels: the smooth anatomy model on the fixed grid
    names = total_class_names_if_installed()
    fp = compute_structures(lab, aff, names)
    # what every case's deformable tier runs with: the grid also covers the CT's field of view
    defo_options = replace(deformable_options or DeformableOptions(), bbox_mm=fov_bbox_mm(img.shape, aff))
    body = voxel_to_world(np.argwhere(img > BODY_HU), aff)
    center = voxel_to_world((np.array(img.shape) - 1)[None] / 2.0, aff)[0]
    kw = {"fixed_labels": lab, "fixed_passport": fp, "label_sigma_vox": label_sigma_vox,
          "n_points": n_points, "rigid_options": rigid_options,
          "deformable_options": defo_options, "with_dice": with_dice}
    out: dict[str, Any] = {"ct": str(ct_path), "labels": str(seg_path), "shape": list(img.shape),
                           "n_structures": len(fp), "label_sigma_vox": label_sigma_vox, "seed": seed, "n_cases": n_cases,
                           "max_angle_deg": max_angle_deg, "max_shift_mm": max_shift_mm,
                           "deformable_settings": asdict(defo_options),
                           "results": {}}
    if include_self:
        case = evaluate_case(img, anatomy, aff, names, KnownTransform.identity(), seed=seed, **kw)
        out["results"]["self"] = {"cases": [case], "summary": summarise_cases([case])}
    groups = ([0.0] if include_rigid_only else []) + [float(m) for m in magnitudes]
    for gi, peak in enumerate(groups):
        cases = []
        for c in range(n_cases):
            rng = np.random.default_rng([seed, gi, c])
            known = random_known_transform(rng, center, body, max_angle_deg=max_angle_deg,
                                           max_shift_mm=max_shift_mm, peak_mm=peak)
            case = evaluate_case(img, anatomy, aff, names, known, seed=seed + c, **kw)
            case["truth"]["shift_mm_at_centre"] = float(np.linalg.norm(known.moving_to_fixed(center[None])[0]
                                                                       - center))
            cases.append(case)
        key = "rigid_only" if peak == 0 else f"peak_{peak:g}mm"
        out["results"][key] = {"cases": cases, "summary": summarise_cases(cases)}
    n_breathing = n_cases if breathing_cases is None else breathing_cases
    if n_breathing and label_mask(lab, names, LUNG).any():
        template = breathing_field(lab, aff, names, body)
        cases = []
        for c in range(n_breathing):
            rng = np.random.default_rng([seed, len(groups), c])
            known = random_breathing_transform(rng, center, body, template, max_angle_deg=max_angle_deg,
                                               max_shift_mm=max_shift_mm)
            case = evaluate_case(img, anatomy, aff, names, known, seed=seed + c, **kw)
            case["truth"]["shift_mm_at_centre"] = float(np.linalg.norm(known.moving_to_fixed(center[None])[0]
                                                                       - center))
            cases.append(case)
        out["results"]["breathing"] = {"cases": cases, "summary": summarise_cases(cases),
                                       "model": "registration/breathing.py: cranio-caudal 10-30 mm decaying over "
                                                f"{template.decay_mm:g} mm from the lungs, AP expansion 4-10 mm, "
                                                f"sliding over {template.slide_mm:g} mm at the lung outline"}
    return out



def timing_full_passport(n_structures: int = 117, n_points: int = 500, seed: int = 0, repeats: int = 3,
                         rigid_options: RigidOptions | None = None,
                         deformable_options: DeformableOptions | None = None) -> dict[str, Any]:
    """Runtime (ms) of rigid and rigid + TPS on passports of ``n_structures`` x ``n_points`` boundary points."""
    rng = np.random.default_rng(seed)
    fixed = synthetic_structures(n_structures, n_points, rng)
    known = random_known_transform(rng, np.zeros(3), np.array([s.centroid_mm for s in fixed]), peak_mm=10.0)
    # the moving passport: what registration reads, moved by the truth (the other fields are kept)
    moving = [s.replace(centroid_mm=known.fixed_to_moving(s.centroid_mm[None])[0],
                        eigenvectors=known.rotation.T @ s.eigenvectors,
                        boundary_points_mm=known.fixed_to_moving(s.boundary_points_mm)) for s in fixed]
    rig, tps = [], []
    for _ in range(repeats):
        r, d, _ = register_passports(fixed, moving, rigid_options, deformable_options or DeformableOptions())
        rig.append(r.time_ms)
        tps.append(d.time_ms["total"])
    return {"n_structures": n_structures, "n_points": n_points, "repeats": repeats,
            "rigid_ms": {"median": float(np.median(rig)), "max": float(np.max(rig))},
            "tps_ms": {"median": float(np.median(tps)), "max": float(np.max(tps))},
            "total_ms_median": float(np.median(np.array(rig) + np.array(tps))),
            "n_control_points": d.n_control_points, "grid_shape": list(d.grid.shape), "tps_parts_ms": d.time_ms}
