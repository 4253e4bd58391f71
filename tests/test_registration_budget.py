"""Issue 11 (1b): a control-point budget below one per structure must not hang the registration.

``registration.spline.assign_cells`` (formerly ``registration.deformable._cells``) used to grow its cells until there were at most ``budget`` of them,
but every structure always keeps one cell, so a budget under the number of structures never ended
(``--max-control-points`` below about twice the number of structures hung at 100 % CPU). The floor is
now one cell per structure plus the centroids, and the result says when it was applied.

Every registration here runs under a time limit: in process through ``within`` (a SIGALRM timer, so a
hang FAILS the test instead of blocking the run), as a subprocess through ``subprocess.run(timeout=)``.
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.registration_cases import NAMES, make_passport, moved_passport

from common.imaging.labels import total_class_names_if_installed
from common.records.passport import build_passport, save_passport
from registration.deformable import register_deformable, to_transform
from registration.harness import load_ct_and_labels
from registration.register import main as register_main
from registration.rigid import register_rigid
from registration.spline import assign_cells
from registration.structures import structure_table
from registration.synthetic import rotation_matrix

ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS_LIMIT_S = 10.0  # measured 0.2-0.9 s each; generous for a loaded 2-core machine
SUBPROCESS_LIMIT_S = 30.0  # python start-up + scipy import + registration of the real-CT passports


def within(limit_s: float, fn, *args, **kwargs):
    """fn(*args, **kwargs), failing the test (not hanging it) when it runs longer than ``limit_s``."""

    def alarm(signum, frame):
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} still running after {limit_s:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - t0
    assert elapsed < limit_s, f"took {elapsed:.1f} s (limit {limit_s:g} s)"
    return result


# ---- assign_cells --------------------------------------------------------------------------------

def owners_and_points(n_owners: int = 6, per_owner: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pts = np.concatenate([rng.uniform(-60, 60, (per_owner, 3)) + rng.uniform(-200, 200, 3) for _ in range(n_owners)])
    return pts, np.repeat(np.arange(n_owners), per_owner)


@pytest.mark.parametrize("budget", [0, 1, 2, 5])
def test_cells_below_floor_is_one_cell_per_structure(budget):
    pts, owner = owners_and_points(6)
    cell, h = within(5.0, assign_cells, pts, owner, budget, 10.0)
    assert len(cell) == len(pts) and math.isfinite(h) and h >= 10.0
    assert cell.max() + 1 == 6  # the floor: 6 structures -> 6 cells
    for o in range(6):  # one cell per structure, never shared between structures
        assert len(np.unique(cell[owner == o])) == 1
    assert len(np.unique(cell)) == 6


@pytest.mark.parametrize("budget", [6, 20, 100, 10_000])
def test_cells_within_budget_unchanged(budget):
    """Budgets at or above the floor: at most ``budget`` cells, at the first h (x 1.15 steps) that gets there."""
    pts, owner = owners_and_points(6)
    cell, h = within(5.0, assign_cells, pts, owner, budget, 10.0)
    assert cell.max() + 1 <= budget
    if h > 10.0:  # the previous (smaller) h had too many cells
        q = np.floor((pts - pts.min(axis=0)) / (h / 1.15)).astype(np.int64)
        assert len(np.unique(np.column_stack([owner, q]), axis=0)) > budget


def test_cells_pathological_inputs_terminate():
    pts, owner = owners_and_points(4, 20)
    bad = pts.copy()
    bad[3] = np.nan
    bad[25, 1] = np.inf
    bad[50, 2] = -np.inf
    for points, cell_mm in [(bad, 10.0), (np.full_like(pts, np.nan), 10.0), (np.zeros_like(pts), 10.0),
                            (pts, 0.0), (pts, float("nan")), (pts, float("inf")), (pts, 1e-300)]:
        for budget in (0, 2, 4, 1000):
            cell, _ = within(5.0, assign_cells, points, owner, budget, cell_mm)
            assert len(cell) == len(points) and cell.min() >= 0
            assert cell.max() + 1 >= 4  # structures never share a cell
            assert cell.max() + 1 <= max(budget, 4)


# ---- register_deformable (synthetic passports of test_registration) ---------------------------

N_SYN = len(NAMES)  # 20 structures -> 20 centroids


@pytest.fixture(scope="module")
def synthetic_pair():
    fixed = make_passport(21)
    moving = moved_passport(fixed, rotation_matrix([0, 1, 1], 6.0), np.array([4.0, -5.0, 3.0]))
    return fixed, moving, register_rigid(fixed, moving)


@pytest.mark.parametrize("budget", [0, 1, 2, N_SYN - 1, N_SYN, 2 * N_SYN - 1, 1000])
def test_register_deformable_small_budget_terminates(synthetic_pair, budget):
    fixed, moving, rigid = synthetic_pair
    defo = within(IN_PROCESS_LIMIT_S, register_deformable, fixed, moving, rigid, max_control_points=budget)
    s = defo.settings
    assert defo.n_centroids == N_SYN and len(defo.structures_used) == N_SYN
    assert np.all(np.isfinite(defo.grid.fixed_to_moving)) and np.all(np.isfinite(defo.grid.moving_to_fixed))
    assert s["max_control_points"] == budget and s["max_control_points_effective"] == s["n_cells"] + N_SYN
    if budget < 2 * N_SYN:  # below one cell per structure + the centroids: the floor
        assert s["budget_floor_applied"] is True and s["n_cells"] == N_SYN
        assert "below the floor" in s["budget_note"] and f"{N_SYN} cells + {N_SYN} centroids" in s["budget_note"]
        assert defo.n_control_points <= 2 * N_SYN
    else:
        assert s["budget_floor_applied"] is False and s["budget_note"] is None
        assert s["max_control_points_effective"] <= budget
    assert json.loads(json.dumps(defo.to_dict()))["settings"]["budget_floor_applied"] == s["budget_floor_applied"]
    # rigid truth: the spline must not invent a deformation, at the floor either
    T = to_transform(rigid, defo)
    fixed_c = np.array([st.centroid_mm for st in fixed])
    moving_c = np.array([st.centroid_mm for st in moving])
    assert np.linalg.norm(T.fixed_to_moving(fixed_c) - moving_c, axis=1).max() < 0.5


def test_register_deformable_rejects_bad_cell_size(synthetic_pair):
    fixed, moving, rigid = synthetic_pair
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cell_mm"):
            register_deformable(fixed, moving, rigid, cell_mm=bad)


# ---- registration/register.py on passports of the real CT ---------------------------------------

@pytest.fixture(scope="module")
def ct_passports(example_ct_sm, example_seg, tmp_path_factory) -> tuple[Path, Path, int]:
    """Fixed: the passport of example_seg on its own grid. Moving: the same label map on a grid
    rotated by 4 deg and shifted (a known rigid change of frame; no resampling)."""
    _, anatomy, aff = load_ct_and_labels(example_ct_sm, example_seg)
    names = total_class_names_if_installed()
    moved = np.eye(4)
    moved[:3, :3] = rotation_matrix([0.2, 0.3, 1.0], 4.0)
    moved[:3, 3] = [6.0, -4.0, 5.0]
    d = tmp_path_factory.mktemp("budget_passports")
    a = save_passport(build_passport(anatomy, aff, names, scan={}, model={}, resolution="original"), d / "A.json")
    pb = build_passport(anatomy, moved @ aff, names, scan={}, model={}, resolution="original")
    b = save_passport(pb, d / "B.json")
    return a, b, len(structure_table(pb, 8))  # structures the registration uses (min_voxels 8)


def budgets_for(n_structures: int) -> list[int]:
    return [0, 1, 2, n_structures // 2, n_structures + n_structures // 2, 1000]


def check_report(out: Path, budget: int, n_structures: int) -> dict:
    rep = json.loads((out / "registration.json").read_text(encoding="utf-8"))
    s = rep["deformable"]["settings"]
    assert rep["settings"]["max_control_points"] == budget == s["max_control_points"]
    assert rep["deformable"]["n_centroids"] == n_structures
    floor = budget < 2 * n_structures
    assert s["budget_floor_applied"] is floor
    if floor:
        assert s["n_cells"] == n_structures and "below the floor" in s["budget_note"]
    assert rep["deformable"]["jacobian"]["fraction_nonpositive"] < 0.01
    return rep


def test_register_run_in_process_small_budgets(ct_passports, tmp_path, capsys):
    """The same path as the CLI (register.main -> run -> register_rigid + register_deformable)."""
    a, b, n = ct_passports
    assert n > 20  # real anatomy: many structures, so every budget below is under the old hang threshold
    for budget in budgets_for(n):
        out = tmp_path / f"b{budget}"
        rc = within(IN_PROCESS_LIMIT_S, register_main, ["--fixed-passport", str(a), "--moving-passport", str(b),
                                                        "--out", str(out), "--max-control-points", str(budget)])
        assert rc == 0
        check_report(out, budget, n)
        printed = capsys.readouterr().out
        assert ("floor applied" in printed) is (budget < 2 * n)


def run_register(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "registration/register.py", *args], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=SUBPROCESS_LIMIT_S)


@pytest.mark.parametrize("which", range(6))
def test_register_cli_small_budgets_subprocess(ct_passports, tmp_path, which):
    a, b, n = ct_passports
    budget = budgets_for(n)[which]
    out = tmp_path / "out"
    r = run_register("--fixed-passport", str(a), "--moving-passport", str(b), "--out", str(out),
                     "--max-control-points", str(budget))
    assert r.returncode == 0, r.stderr
    check_report(out, budget, n)
    assert (out / "transform.json").is_file()


# ---- argument validation: one line, exit 2, no traceback ----------------------------------------

def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("option,value", [("--max-control-points", "-1"), ("--max-control-points", "1.5"),
                                          ("--smoothing", "-1"), ("--smoothing", "nan"),
                                          ("--residual-threshold", "0"), ("--residual-threshold", "inf")])
def test_register_cli_refuses_bad_numbers(tmp_path, option, value):
    r = run_register("--fixed-passport", "A.json", "--moving-passport", "B.json", "--out", str(tmp_path / "o"),
                     option, value)
    assert_one_line_error(r, option, repr(value))
    assert not (tmp_path / "o").exists()


def test_evaluate_cli_refuses_bad_numbers(tmp_path):
    for option, value in [("--max-control-points", "-1"), ("--iterations", "-2"), ("--cases", "0"),
                          ("--seed", "-1"), ("--magnitudes", "nan")]:
        r = subprocess.run([sys.executable, "registration/evaluate.py", "--batch-only", "--out", str(tmp_path / "e.json"),
                            option, value], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=SUBPROCESS_LIMIT_S)
        assert_one_line_error(r, option, repr(value))
    assert not (tmp_path / "e.json").exists()


def test_zero_budget_accepted_by_both_parsers():
    from registration.evaluate import build_parser as eval_parser
    from registration.register import build_parser as reg_parser
    args = reg_parser().parse_args(["--fixed-passport", "A", "--moving-passport", "B", "--out", "o",
                                    "--max-control-points", "0"])
    assert args.max_control_points == 0 and args.smoothing == 1e4 and args.residual_threshold == 15.0
    args = eval_parser().parse_args(["--max-control-points", "0", "--iterations", "0"])
    assert args.max_control_points == 0 and args.iterations == 0
    assert args.cases == 3 and args.seed == 0 and args.points == 20000 and args.magnitudes == [5.0, 10.0, 20.0]
