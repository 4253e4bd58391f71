"""Batch mode of the harness: register paired scans without landmarks (e.g. Learn2Reg exp/insp pairs).

Pairs named <id>_exp / <id>_insp (.nii/.nii.gz, in a folder or its sub-folders) are registered (fixed = insp,
moving = exp) when each scan has a label map (<scan>_seg.nii.gz or <scan>_labels.nii.gz) or a passport
(<scan>.passport.json); without landmarks it reports runtime (ms), Dice of the labels and folding only.
Each pair records its inputs' "provenance" (registration/provenance.py: a passport's model, weights kind and
checkpoint sha256; a label map's is unknown); a pair mixing stand-in and official weights is refused (recorded
with its one-line error) unless ``allow_mixed_weights``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.core.errors import InputError
from common.imaging.labels import checked_label_array, total_class_names_if_installed
from common.records.passport import compute_structures
from registration.accuracy import dice_scores
from registration.deformable import jacobian_stats
from registration.inputs import load_checked_passport, load_checked_scan
from registration.options import DeformableOptions, RigidOptions
from registration.provenance import check_inputs
from registration.rigid import rotation_angle_deg
from registration.structures import Structures
from registration.transform import Transform, warp_labels
from registration.two_tier import TierError, register_passports


def _scan_stem(p: Path) -> str:
    name = p.name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def find_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """(pair id, exp scan, insp scan) for files named <id>_exp / <id>_insp (.nii[.gz]) under ``folder``."""
    scans: dict[tuple[Path, str], dict[str, Path]] = {}
    for p in sorted(folder.rglob("*.nii*")):
        stem = _scan_stem(p)
        for tag in ("exp", "insp"):
            if stem.endswith("_" + tag):
                scans.setdefault((p.parent, stem[: -len(tag) - 1]), {})[tag] = p
    pairs = []
    for (parent, pid), d in sorted(scans.items()):
        if "exp" in d and "insp" in d:
            rel = (parent / pid).relative_to(folder)
            pairs.append((str(rel), d["exp"], d["insp"]))
    return pairs


def _labels_or_passport(scan: Path) -> tuple[np.ndarray | None, np.ndarray | None, Structures | None, Path | None]:
    """(labels, affine, passport-or-structures, passport file or None) for a scan from <scan>_seg / _labels /
    .passport.json."""
    stem = _scan_stem(scan)
    for suffix in ("_seg", "_labels"):
        for ext in (".nii.gz", ".nii"):
            p = scan.parent / f"{stem}{suffix}{ext}"
            if p.is_file():
                img = load_checked_scan(p, modality="ANY").image  # header size, RGB, 4-D, NaN... : InputError
                # non-integer labels: InputError; negative ones are background (as in passports)
                lab = checked_label_array(np.asarray(img.dataobj), p, ndim=3,
                                          negative_as_background=True).astype(np.int32)
                names = total_class_names_if_installed()
                return lab, np.asarray(img.affine, np.float64), compute_structures(lab, img.affine, names), None
    p = scan.parent / f"{stem}.passport.json"
    if p.is_file():
        return None, None, load_checked_passport(p), p
    return None, None, None, None


def register_pair(pid: str, exp: Path, insp: Path, rigid_options: RigidOptions | None = None,
                  deformable_options: DeformableOptions | None = None, *,
                  allow_mixed_weights: bool = False) -> dict[str, Any]:
    """Register one exp/insp pair (fixed = insp, moving = exp): runtime, label Dice, folding, the inputs'
    provenance (InputError if bad, a stand-in/official mix included unless ``allow_mixed_weights``)."""
    f_lab, f_aff, fp, f_file = _labels_or_passport(insp)
    m_lab, m_aff, mp, m_file = _labels_or_passport(exp)
    if fp is None or mp is None:
        return {"pair": pid, "skipped": "no label map (<scan>_seg.nii.gz) or passport for both scans"}
    provenance = check_inputs(fp, f_file, mp, m_file, allow_mixed_weights=allow_mixed_weights)
    try:
        rigid, defo, T = register_passports(fp, mp, rigid_options, deformable_options or DeformableOptions())
    except TierError as exc:
        cause = exc.__cause__
        if exc.tier == "deformable" and isinstance(cause, np.linalg.LinAlgError):  # e.g. all control points in one plane
            raise InputError(insp, f"the thin-plate spline cannot be fitted ({cause})") from None
        raise
    r: dict[str, Any] = {"pair": pid, "fixed": str(insp), "moving": str(exp), "provenance": provenance,
                         "time_ms": {"rigid": rigid.time_ms, "tps": defo.time_ms["total"]},
                         "rigid": {"rotation_deg": rotation_angle_deg(rigid.rotation),
                                   "translation_mm": rigid.translation.tolist(),
                                   "outliers": rigid.outliers},
                         "jacobian": jacobian_stats(defo.grid), "n_control_points": defo.n_control_points}
    if f_lab is not None and m_lab is not None:
        labels = np.unique(f_lab[f_lab > 0])
        r["dice"] = {name: dice_scores(warp_labels(m_lab, m_aff, f_lab.shape, f_aff, est), f_lab, labels)
                     for name, est in (("none", Transform.identity()), ("rigid", T.rigid_only()),
                                       ("rigid_tps", T))}
    return r


def run_batch(folder: Path, *, rigid_options: RigidOptions | None = None,
              deformable_options: DeformableOptions | None = None, allow_mixed_weights: bool = False
              ) -> dict[str, Any]:
    """Register every exp/insp pair under ``folder``; a pair with a bad file (or a refused stand-in/official mix)
    is recorded with its one-line error."""
    if not folder.is_dir():
        return {"folder": str(folder), "message": f"no paired scans: {folder} does not exist", "pairs": []}
    pairs = find_pairs(folder)
    if not pairs:
        return {"folder": str(folder), "message": f"no *_exp/*_insp scan pairs found under {folder}", "pairs": []}
    results = []
    for pid, exp, insp in pairs:
        try:
            results.append(register_pair(pid, exp, insp, rigid_options, deformable_options,
                                         allow_mixed_weights=allow_mixed_weights))
        except InputError as exc:  # one bad pair: recorded, the batch goes on
            results.append({"pair": pid, "error": str(exc)})
    failed = sum("error" in r for r in results)
    return {"folder": str(folder), "message": f"{len(pairs)} pair(s) found" + (f", {failed} failed" if failed else ""),
            "pairs": results}
