"""Issue 14, "tracebacks where one line belongs", for 08, 09 and registration: each bad input below gets ONE
line on stderr naming the file and the problem, a non-zero exit code, and no traceback.

Every bad input is made at test time from the real CT (example_ct_sm) and a passport of its official labels
(example_seg). The scripts run in process through ``main(argv)`` (an exception escaping main fails the test,
so a traceback cannot hide); one subprocess per script checks the same through the command line.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.core.atomic import atomic_write_json
from common.imaging.volume import load_volume
from common.records.passport import build_passport, save_passport, scan_metadata

ROOT = Path(__file__).resolve().parents[1]
PICTURES = ["08_visualize_passport", "09_visualize_spine"]
RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])  # what nibabel writes as NIfTI RGB24


def script(name: str):
    return importlib.import_module(name)


def one_line(capsys, code: int, *needles: str) -> str:
    """The single stderr line of a failed in-process run; checks the exit code and the needles in it."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, example_ct_sm, example_seg) -> dict[str, Path]:
    """Scans and passports, good and bad, made from the real CT: name -> path."""
    from totalsegmentator.map_to_binary import class_map

    folder = tmp_path_factory.mktemp("no_traceback")
    scan = load_volume(example_ct_sm).image
    hu = np.asarray(scan.dataobj).astype(np.int16)
    labels = np.asarray(nib.load(example_seg).dataobj)
    paths = {}

    def save_image(name: str, array: np.ndarray, affine: np.ndarray) -> Path:
        paths[name] = folder / name
        nib.save(nib.Nifti1Image(array, affine), paths[name])
        return paths[name]

    grey = np.clip((hu + 1024) // 8, 0, 255).astype(np.uint8)
    rgb = np.empty(grey.shape, dtype=RGB)
    for channel in "RGB":
        rgb[channel] = grey
    save_image("rgb.nii.gz", rgb, scan.affine)
    save_image("rgb5d.nii.gz", np.stack([grey] * 3, axis=-1)[:, :, :, None, :], scan.affine)  # (x, y, z, 1, 3)
    tiny = scan.affine.copy()
    tiny[:3, :3] *= 0.001 / np.linalg.norm(tiny[:3, :3], axis=0)  # 0.001 mm voxels, same axes
    save_image("tiny.nii.gz", hu, tiny)
    save_image("plain.nii", hu, scan.affine)
    for name, source in (("cut.nii.gz", example_ct_sm), ("cut.nii", paths["plain.nii"])):
        raw = Path(source).read_bytes()
        paths[name] = folder / name
        paths[name].write_bytes(raw[: len(raw) * 2 // 3])

    def passport(name: str, affine: np.ndarray, scan_file: Path, edit=None) -> Path:
        p = build_passport(labels, affine, class_map["total"], scan=scan_metadata(scan_file, scan),
                           model={"name": "official example_seg"}, resolution="original", max_points=50)
        if edit is None:
            paths[name] = save_passport(p, folder / name)
        else:  # a bad passport on purpose: its JSON document edited, written as save_passport writes one
            doc = p.to_json()
            edit(doc)
            paths[name] = atomic_write_json(folder / name, doc, indent=None)
        return paths[name]

    passport("good.json", scan.affine, example_ct_sm)
    passport("tiny.json", tiny, paths["tiny.nii.gz"])
    for cut in ("cut.nii.gz", "cut.nii"):
        passport(f"scan_{cut}.json", scan.affine, paths[cut])
    for kind, value in (("int", 123), ("list", ["ct.nii.gz"]), ("object", {"path": "ct.nii.gz"}), ("bool", True)):
        passport(f"scan_file_{kind}.json", scan.affine, example_ct_sm, lambda p, v=value: p["scan"].update(file=v))

    def same_points(p: dict, centroids: bool) -> None:
        for s in p["structures"]:
            if centroids:
                s["centroid_mm"] = [1.0, 2.0, 3.0]
            s["boundary_points_mm"] = [[1.0, 2.0, 3.0]] * len(s["boundary_points_mm"])

    passport("identical.json", scan.affine, example_ct_sm, lambda p: same_points(p, True))
    passport("identical_boundary.json", scan.affine, example_ct_sm, lambda p: same_points(p, False))
    paths["ct"] = example_ct_sm
    paths["seg"] = example_seg
    paths["a_file"] = folder / "a_file.txt"
    paths["a_file"].write_text("not a folder\n", encoding="utf-8")
    return paths


def register(*args: str) -> int:
    from registration.register import main

    return main(list(args))


def register_args(data, tmp_path, fixed: str = "good.json", moving: str = "good.json") -> list[str]:
    return ["--fixed-passport", str(data[fixed]), "--moving-passport", str(data[moving]), "--out", str(tmp_path / "r")]


# ---- RGB NIfTI ------------------------------------------------------------------------------------

@pytest.mark.parametrize("image, needle", [("rgb.nii.gz", "R/G/B"), ("rgb5d.nii.gz", "3 volumes")])
@pytest.mark.parametrize("name", PICTURES)
def test_pictures_refuse_an_rgb_scan(data, tmp_path, capsys, name, image, needle):
    code = script(name).main(["--passport", str(data["good.json"]), "--scan", str(data[image]),
                              "--out", str(tmp_path / "o.png")])
    one_line(capsys, code, str(data[image]), needle)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("image, needle", [("rgb.nii.gz", "R/G/B"), ("rgb5d.nii.gz", "3 volumes")])
@pytest.mark.parametrize("which", ["--fixed-scan", "--moving-scan"])
def test_register_refuses_an_rgb_scan(data, tmp_path, capsys, image, needle, which):
    scans = {"--fixed-scan": str(data["ct"]), "--moving-scan": str(data["ct"]), which: str(data[image])}
    code = register(*register_args(data, tmp_path), *[x for kv in scans.items() for x in kv])
    one_line(capsys, code, str(data[image]), needle)


def test_evaluate_refuses_an_rgb_scan(data, tmp_path, capsys):
    from registration.evaluate import main

    code = main(["--ct", str(data["rgb.nii.gz"]), "--labels", str(data["seg"]), "--out", str(tmp_path / "e.json"),
                 "--no-timing"])
    one_line(capsys, code, str(data["rgb.nii.gz"]), "R/G/B")
    assert not (tmp_path / "e.json").exists()


# ---- passports given to 08/09: truncated scan, wrongly typed scan.file ----------------------------

@pytest.mark.parametrize("cut", ["cut.nii.gz", "cut.nii"])
@pytest.mark.parametrize("name", PICTURES)
def test_pictures_report_a_truncated_scan(data, tmp_path, capsys, name, cut):
    code = script(name).main(["--passport", str(data[f"scan_{cut}.json"]), "--out", str(tmp_path / "o.png")])
    one_line(capsys, code, str(data[cut]), "truncated")


@pytest.mark.parametrize("kind", ["int", "list", "object", "bool"])
@pytest.mark.parametrize("name", PICTURES)
def test_pictures_report_a_wrongly_typed_scan_file(data, tmp_path, capsys, name, kind):
    passport = data[f"scan_file_{kind}.json"]
    code = script(name).main(["--passport", str(passport), "--out", str(tmp_path / "o.png")])
    one_line(capsys, code, str(passport), "scan.file is not a file path")


# ---- registration: --smoothing nan, passports whose points are all identical ------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_register_refuses_a_bad_smoothing(data, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stop:
        register(*register_args(data, tmp_path), "--smoothing", value)
    one_line(capsys, stop.value.code, "--smoothing", repr(value))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bad, needle", [("identical.json", "structure centroids are the same point"),
                                         ("identical_boundary.json", "boundary points are the same point")])
@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_register_refuses_a_passport_whose_points_are_identical(data, tmp_path, capsys, bad, needle, role):
    code = register(*register_args(data, tmp_path, **{role: bad}))
    one_line(capsys, code, str(data[bad]), needle)
    assert not (tmp_path / "r" / "transform.json").exists()


# ---- outputs that are a file where a folder belongs (and the reverse) ------------------------------

def test_register_out_is_an_existing_file(data, tmp_path, capsys):
    code = register("--fixed-passport", str(data["good.json"]), "--moving-passport", str(data["good.json"]),
                    "--out", str(data["a_file"]))
    one_line(capsys, code, str(data["a_file"]), "not a folder")
    assert data["a_file"].read_text(encoding="utf-8") == "not a folder\n"


def test_evaluate_out_is_an_existing_folder(data, tmp_path, capsys):
    from registration.evaluate import main

    code = main(["--out", str(tmp_path), "--ct", str(data["ct"]), "--labels", str(data["seg"]), "--no-timing"])
    one_line(capsys, code, str(tmp_path), "is a folder")


@pytest.mark.parametrize("name", PICTURES)
def test_pictures_out_is_an_existing_folder(data, tmp_path, capsys, name):
    code = script(name).main(["--passport", str(data["good.json"]), "--out", str(tmp_path)])
    one_line(capsys, code, str(tmp_path), "is a folder")


# ---- voxel sizes of 0.001 mm: world-mm geometry throughout, so a correct result, not NaN ---------------

@pytest.mark.parametrize("name", PICTURES)
def test_pictures_draw_on_a_scan_with_0_001_mm_voxels(data, tmp_path, capsys, name):
    out = tmp_path / "o.png"
    assert script(name).main(["--passport", str(data["tiny.json"]), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and capsys.readouterr().err == ""


def test_register_scans_with_0_001_mm_voxels(data, tmp_path, capsys):
    scan = str(data["tiny.nii.gz"])
    assert register(*register_args(data, tmp_path, "tiny.json", "tiny.json"),
                    "--fixed-scan", scan, "--moving-scan", scan) == 0
    report = json.loads((tmp_path / "r" / "registration.json").read_text(encoding="utf-8"))
    assert report["rigid"]["rotation_angle_deg"] < 1e-6 and (tmp_path / "r" / "overlay.png").is_file()
    assert capsys.readouterr().err == ""


# ---- the same through the command line (run_script, exit codes, stderr of a fresh interpreter) --------

def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LANG"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace",
                          timeout=120, env=env)


@pytest.mark.parametrize("command", [
    lambda d, t: ["08_visualize_passport.py", "--passport", str(d["scan_file_list.json"]), "--out", str(t / "o.png")],
    lambda d, t: ["09_visualize_spine.py", "--passport", str(d["good.json"]), "--scan", str(d["rgb.nii.gz"]),
                  "--out", str(t / "o.png")],
    lambda d, t: ["registration/register.py", *register_args(d, t, "identical.json")],
    lambda d, t: ["registration/evaluate.py", "--ct", str(d["rgb.nii.gz"]), "--labels", str(d["seg"]),
                  "--out", str(t / "e.json")],
], ids=["08-scan-file-list", "09-rgb", "register-identical", "evaluate-rgb"])
def test_command_line(data, tmp_path, command):
    done = run(*command(data, tmp_path))
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr and lines[0].startswith("error: /")
