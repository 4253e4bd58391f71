"""Command line of the evaluation harness: registration accuracy against KNOWN transforms of a real CT, plus a batch mode.

Synthetic mode (default): the real CT and its label map are the FIXED scan. A known transform
(rigid: rotation about the scan centre up to ``max_angle_deg``, shift up to ``max_shift_mm``;
deformation: a few seeded Gaussian bumps scaled to a peak displacement, or breathing: registration/breathing.py,
a 10-30 mm cranio-caudal shift decaying away from the lungs, AP chest expansion and sliding at the lung outline)
defines the truth mapping psi: MOVING world mm -> FIXED world mm. The moving scan and label map are made by pulling the fixed
ones through psi with map_coordinates onto a moving grid that covers the transformed field of view
(same voxel size and axes as the fixed scan): the image trilinearly; the labels from a smooth anatomy
model (each label's indicator blurred by 1 voxel, sampled with cubic splines, argmax with background;
the fixed labels are the same model on the fixed grid). A plain nearest-neighbour warp of a 3 mm label
map rounds nearly translational shifts to whole voxels and biased centroids by up to 1.5 mm per axis
(measured: rigid TRE 1.66 mm instead of 0.31 mm for a 0.25 deg case). Passports are
built from the label maps ONLY (common.records.passport.compute_structures); the registration never sees
the truth. Target registration error (TRE, mm) is measured in the MOVING scan, Learn2Reg style:
for fixed points x, |T_est(x) - psi^-1(x)| with T_est the estimated FIXED -> MOVING mapping, at
 - structure centroids,
 - dense points: a seeded sample of voxels with HU > -500 (inside the body),
 - points inside structures (labelled voxels whose 6 neighbours share the label) and
 - points at structure boundaries (labelled voxels with a differently labelled neighbour),
and in the lungs, the abdominal organs and bone, for no registration, rigid only, and rigid + TPS. Also: Dice
of the warped labels (circular: the same labels drive the registration), Jacobian folding of the deformable
field, runtime, and per case whether the TPS was kept and the smoothing it chose (registration/validation.py).

Defaults: every family (self, rigid, 5/10/20 mm, breathing; 3 cases each) on the shared CT with each real
label map next to it (example_seg: the 1.5 mm model, 41 classes; example_seg_fast: the fast model, 40
classes), then one case each of rigid, the largest magnitude and breathing on a clinical-size variant made
now (registration/eval_inputs.py: 512 x 512 at 0.98 x 0.98 x 2 mm), and the full-passport timing. The JSON's
"synthetic" holds one result per input (keyed by its name), "summary" one row per input and family.

Batch mode (--batch DIR, default ct_data/learn2reg): pairs named <id>_exp / <id>_insp (.nii/.nii.gz,
in DIR or its sub-folders) are registered when each scan has a label map (<scan>_seg.nii.gz or
<scan>_labels.nii.gz) or a passport (<scan>.passport.json); without landmarks it reports runtime,
Dice of the labels and folding only. Each pair records its inputs' provenance (registration/provenance.py);
a pair mixing stand-in and official passports fails with one line unless --allow-mixed-weights, and each
other mismatch is one "warning: <pair>: ..." line on stderr.

Run:  python registration/evaluate.py [--out benchmarks/registration_eval.json] [--magnitudes 5 10 20]

Modules: registration/synthetic.py (truth model, moving scans), registration/accuracy.py (TRE, Dice,
folding), registration/harness.py (cases, timing), registration/batch.py (pairs); this file is the CLI.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.cli.args import (
    OneLineParser,
    check_outputs,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    run_script,
)
from common.core.atomic import atomic_write_json
from common.core.errors import InputError
from common.core.paths import BENCHMARKS, CT_DATA, PROJECT_ROOT
from registration.batch import run_batch
from registration.eval_inputs import clinical_case
from registration.harness import run_synthetic, timing_full_passport
from registration.inputs import FLOOR_HELP
from registration.options import DeformableOptions, RigidOptions
from registration.provenance import warning_lines

DEFAULT_CT = PROJECT_ROOT.parent / "shared" / "data" / "ct" / "example_ct_sm.nii.gz"
DEFAULT_OUT = BENCHMARKS / "registration_eval.json"
DEFAULT_BATCH = CT_DATA / "learn2reg"


def _fmt_line(key: str, s: dict[str, Any]) -> str:
    b = s["tre_mm"]["body"]
    line = (f"{key:>12}: body TRE mm mean/p95/max  none {b['none']['mean']:.2f}/{b['none']['p95']:.2f}/"
            f"{b['none']['max']:.2f}  rigid {b['rigid']['mean']:.2f}/{b['rigid']['p95']:.2f}/{b['rigid']['max']:.2f}"
            f"  rigid+TPS {b['rigid_tps']['mean']:.2f}/{b['rigid_tps']['p95']:.2f}/{b['rigid_tps']['max']:.2f}")
    ratios = [r for r in s["tps_over_rigid_mean_tre_body_per_case"] if r is not None]
    if s["tps_over_rigid_mean_tre_body"] is not None and ratios:
        line += f"  ratio {s['tps_over_rigid_mean_tre_body']:.2f} (worst case {max(ratios):.2f})"
    if "tps_accepted" in s:
        line += f"  TPS kept {sum(s['tps_accepted'])}/{len(s['tps_accepted'])}"
    if "jacobian" in s:
        dmin = s["jacobian"]["det_min"]
        line += (f"  fold {100 * s['jacobian']['fraction_nonpositive_grid_max']:.3f}% det-min "
                 + (f"{dmin:.2f}" if dmin is not None else "n/a"))
    regions = [k for k in ("lungs", "abdomen", "bone") if s["tre_mm"].get(k, {}).get("rigid", {}).get("mean")
               == s["tre_mm"].get(k, {}).get("rigid", {}).get("mean")]  # not NaN
    if regions:
        line += "  [" + ", ".join(f"{k} {s['tre_mm'][k]['rigid']['mean']:.2f}->{s['tre_mm'][k]['rigid_tps']['mean']:.2f}"
                                  for k in regions) + "]"
    line += f"  time rigid {s['time_ms']['rigid_mean']:.1f} ms, TPS {s['time_ms']['tps_mean']:.0f} ms"
    return line


def summary_table(synthetic: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (input, family): TRE mm (mean / p95 / max, body; means per region), TPS kept, folding."""
    rows = []
    for name, res in synthetic.items():
        for family, r in res["results"].items():
            s = r["summary"]
            tre = s["tre_mm"]
            rows.append({"input": name, "family": family, "n_cases": s["n_cases"],
                         "body_mm": {e: tre["body"][e] for e in ("none", "rigid", "rigid_tps")},
                         "region_mean_mm": {k: {e: tre[k][e]["mean"] for e in ("rigid", "rigid_tps")}
                                            for k in ("lungs", "abdomen", "bone", "inside", "boundary") if k in tre},
                         "tps_over_rigid_per_case": s["tps_over_rigid_mean_tre_body_per_case"],
                         "tps_accepted": s.get("tps_accepted"), "smoothing_used": s.get("smoothing_used"),
                         "jacobian_det_min": s.get("jacobian", {}).get("det_min")})
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line (errors: one line, exit 2)."""
    p = OneLineParser(
        prog="python registration/evaluate.py",
        description="Measure passport registration (rigid + TPS) against known transforms of a real CT "
                    "(TRE in mm at centroids / body / inside / boundary points, Dice, folding, runtime); "
                    "optionally register exp/insp pairs in a batch folder.")
    p.add_argument("--ct", type=Path, default=DEFAULT_CT, help="fixed CT (NIfTI). Default: %(default)s")
    p.add_argument("--labels", type=Path, nargs="+", default=None,
                   help="label map(s) on the CT's grid (default: example_seg.nii.gz and example_seg_fast.nii.gz "
                        "next to the CT, those present)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON. Default: %(default)s")
    p.add_argument("--magnitudes", type=nonnegative_float, nargs="+", default=[5.0, 10.0, 20.0], metavar="MM",
                   help="peak deformation displacements in mm (default: 5 10 20)")
    p.add_argument("--cases", type=positive_int, default=3, metavar="N", help="random cases per magnitude (default: 3)")
    p.add_argument("--breathing-cases", type=nonnegative_int, default=None, metavar="N",
                   help="breathing cases per label map (default: --cases; 0: none)")
    p.add_argument("--clinical-cases", type=nonnegative_int, default=1, metavar="N",
                   help="cases per family (rigid, the largest magnitude, breathing) on a clinical-size variant "
                        "(512 x 512 at 0.98 x 0.98 x 2 mm) of the CT with the first label map (default: 1; 0: none)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    p.add_argument("--points", type=positive_int, default=20000, metavar="N",
                   help="evaluation points per point set (default: 20000)")
    p.add_argument("--max-angle", type=nonnegative_float, default=15.0, metavar="DEG",
                   help="max rotation in degrees (default: 15)")
    p.add_argument("--max-shift", type=nonnegative_float, default=30.0, metavar="MM", help="max shift in mm (default: 30)")
    p.add_argument("--smoothing", type=nonnegative_float, default=None,
                   help="TPS smoothing (default: the library default)")
    p.add_argument("--iterations", type=nonnegative_int, default=None, metavar="N", help="ICP rounds of the TPS tier")
    p.add_argument("--mode", choices=("plane", "point"), default=None, help="TPS correspondence mode")
    p.add_argument("--no-mutual", action="store_true", help="use one-way nearest neighbours")
    p.add_argument("--symmetric", action="store_true",
                   help="symmetric point-to-plane matches (the fixed and the moving normal; Rusinkiewicz 2019)")
    p.add_argument("--max-control-points", type=nonnegative_int, default=None, metavar="N",
                   help=f"TPS control-point budget; {FLOOR_HELP}")
    p.add_argument("--smoothing-factors", type=positive_float, nargs="+", default=None, metavar="F",
                   help="TPS smoothing candidates, times --smoothing, chosen by cross-validation "
                        "(default: the library's; 1: no choice)")
    p.add_argument("--keep-tps", action="store_true",
                   help="keep the TPS even where held-out matches say it does not help (no accept/reject)")
    p.add_argument("--no-dice", action="store_true", help="skip the Dice computation (faster)")
    p.add_argument("--no-timing", action="store_true", help="skip the full-passport timing (117 x 500 points)")
    p.add_argument("--batch", type=Path, nargs="?", const=DEFAULT_BATCH, default=None,
                   help=f"also register <id>_exp/<id>_insp pairs under this folder (default {DEFAULT_BATCH})")
    p.add_argument("--batch-only", action="store_true", help="run only the batch mode")
    p.add_argument("--allow-mixed-weights", action="store_true",
                   help="batch mode: register pairs whose passports mix stand-in and official weights "
                        "(refused otherwise); warned and recorded")
    return p


def deformable_options(args: argparse.Namespace) -> DeformableOptions:
    """The TPS options the command line sets (the library defaults for the rest)."""
    dkw: dict[str, Any] = {}
    if args.smoothing is not None:
        dkw["smoothing"] = args.smoothing
    if args.iterations is not None:
        dkw["iterations"] = args.iterations
    if args.mode is not None:
        dkw["mode"] = args.mode
    if args.no_mutual:
        dkw["mutual"] = False
    if args.symmetric:
        dkw["symmetric"] = True
    if args.max_control_points is not None:
        dkw["max_control_points"] = args.max_control_points
    if args.smoothing_factors is not None:
        dkw["smoothing_factors"] = tuple(args.smoothing_factors)
    if args.keep_tps:
        dkw["validate"] = False
    return DeformableOptions(**dkw)


def default_label_maps(ct: Path) -> list[Path]:
    """The real label maps next to the CT (example_seg, example_seg_fast), those that exist; else the first."""
    maps = [ct.parent / n for n in ("example_seg.nii.gz", "example_seg_fast.nii.gz")]
    return [m for m in maps if m.is_file()] or maps[:1]


def _stem(p: Path) -> str:
    return p.name[:-7] if p.name.endswith(".nii.gz") else p.stem


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ropts, dopts = RigidOptions(), deformable_options(args)
    out: dict[str, Any] = {"command": "python registration/evaluate.py " + " ".join(argv or sys.argv[1:]),
                           "deformable_settings": asdict(dopts), "rigid_settings": asdict(ropts)}
    t0 = time.perf_counter()
    try:
        check_outputs(files=(args.out,))  # before any work
        if not args.batch_only:
            maps = args.labels or default_label_maps(args.ct)
            common = {"seed": args.seed, "n_points": args.points, "max_angle_deg": args.max_angle,
                      "max_shift_mm": args.max_shift, "rigid_options": ropts, "deformable_options": dopts}
            out["synthetic"] = {}
            for labels in maps:
                print(f"{_stem(labels)} on {args.ct.name}:")
                res = run_synthetic(args.ct, labels, magnitudes=tuple(args.magnitudes), n_cases=args.cases,
                                    breathing_cases=args.breathing_cases, with_dice=not args.no_dice, **common)
                out["synthetic"][_stem(labels)] = res
                for key, r in res["results"].items():
                    print(_fmt_line(key, r["summary"]))
            if args.clinical_cases:
                img, lab, aff, name = clinical_case(args.ct, maps[0])
                print(f"{name} ({_stem(maps[0])}, clinical-size variant made now):")
                res = run_synthetic(args.ct, maps[0], magnitudes=(max(args.magnitudes),) if args.magnitudes else (),
                                    n_cases=args.clinical_cases, include_self=False, with_dice=False,
                                    volume=(img, lab, aff), **common)
                res["variant"] = ("common.sources.variants.clinical_variant (0.98 x 0.98 x 2 mm, 512 x 512 "
                                  "in-plane, the scan's own z extent); labels resampled by nearest neighbour; "
                                  "no Dice (size)")
                out["synthetic"][f"{name}_{_stem(maps[0])}"] = res
                for key, r in res["results"].items():
                    print(_fmt_line(key, r["summary"]))
            out["summary"] = summary_table(out["synthetic"])
            if not args.no_timing:
                out["timing_full_passport"] = timing_full_passport(rigid_options=ropts, deformable_options=dopts)
                tf = out["timing_full_passport"]
                print(f"full passport {tf['n_structures']} x {tf['n_points']} points: rigid "
                      f"{tf['rigid_ms']['median']:.1f} ms, TPS {tf['tps_ms']['median']:.0f} ms (median of "
                      f"{tf['repeats']})")
        if args.batch is not None or args.batch_only:
            out["batch"] = run_batch(args.batch or DEFAULT_BATCH, rigid_options=ropts, deformable_options=dopts,
                                     allow_mixed_weights=args.allow_mixed_weights)
            print(f"batch: {out['batch']['message']}")
            for r in out["batch"]["pairs"]:
                for line in warning_lines(r.get("provenance"), prefix=f"{r['pair']}: "):
                    print(line, file=sys.stderr)
        out["wall_s"] = time.perf_counter() - t0
        out["machine"] = {"cpu_count": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg()),
                          "note": "timings are wall clock on this machine; other jobs running at the same time "
                                  "inflate them"}
        atomic_write_json(args.out, out)
    except (InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    failed = [r for r in out.get("batch", {}).get("pairs", []) if "error" in r]
    for r in failed:  # recorded in the JSON too; one line each
        print(f"error: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
