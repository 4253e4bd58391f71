"""Passport files (JSON round trip, rejection of bad files), real anatomy and the two picture scripts (08, 09)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from helpers.passport_cases import ROOT, ellipsoid_volume, passport_for
from helpers.script_loader import load_script

from common.core.errors import InputError
from common.records.passport import (
    build_passport,
    load_passport,
    save_passport,
    scan_metadata,
    structure_by_name,
)
from common.records.passport_model import SCHEMA_NAME, SCHEMA_VERSION


def test_passport_layout_and_round_trip(tmp_path):
    labels, affine = ellipsoid_volume("lps")
    passport = passport_for(labels, affine, tmp_path, max_points=50)
    doc = passport.to_json()
    assert doc["schema"] == SCHEMA_NAME and doc["schema_version"] == SCHEMA_VERSION
    assert passport.grid.orientation == "LPS" and list(passport.grid.shape) == list(labels.shape)
    assert doc["grid"]["shape"] == list(labels.shape)
    np.testing.assert_allclose(passport.grid.spacing_mm, [0.9, 0.9, 1.5])
    assert passport.scan["orientation"] == "LPS" and len(passport.scan["sha256"]) == 64
    assert passport.timing_s >= 0
    path = save_passport(passport, tmp_path / "out" / "p.json")
    assert load_passport(path).to_json() == json.loads(json.dumps(doc))
    assert load_passport(path) == passport
    assert structure_by_name(load_passport(path))["egg"].label == 7
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_scan_metadata_of_a_folder_hashes_sorted_contents(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.int16), np.eye(4))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, order in ((tmp_path / "a", ("1", "2")), (tmp_path / "b", ("2", "1"))):
        for name in order:
            (folder / name).write_bytes(name.encode() * 10)
    assert scan_metadata(tmp_path / "a", img)["sha256"] == scan_metadata(tmp_path / "b", img)["sha256"]
    (tmp_path / "b" / "2").write_bytes(b"changed")
    assert scan_metadata(tmp_path / "a", img)["sha256"] != scan_metadata(tmp_path / "b", img)["sha256"]


@pytest.mark.parametrize("mutate, fragment", [
    (lambda p: p.update(schema_version=2), "passport schema version 2, this program reads version 1"),
    (lambda p: p.update(schema="something-else"), "not an anatomical passport"),
    (lambda p: p.pop("grid"), "lacks required key(s): grid"),
    (lambda p: p["structures"][0].pop("centroid_mm"), "structures[0] lacks required key(s): centroid_mm"),
    (lambda p: p["structures"][0].update(eigenvectors=[[1, 0, 0]]), "structures[0].eigenvectors has shape"),
    (lambda p: p["structures"][0].update(boundary_points_mm=[[1, 2]]), "boundary_points_mm has shape"),
    (lambda p: p["grid"].update(affine=np.eye(3).tolist()), "grid.affine has shape"),
])
def test_load_passport_rejects_bad_passports(tmp_path, mutate, fragment):
    labels, affine = ellipsoid_volume("anisotropic_ras")
    doc = passport_for(labels, affine, tmp_path, max_points=5).to_json()
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_passport(path)
    message = str(err.value)
    assert str(path) in message and fragment in message and "\n" not in message


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2, 3]", b""])
def test_load_passport_rejects_malformed_files(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        load_passport(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    with pytest.raises(InputError, match="not found"):
        load_passport(tmp_path / "missing.json")


# ---- real anatomy ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_passport(example_ct_sm, example_seg, tmp_path_factory) -> Path:
    """Passport of the official TotalSegmentator labels of example_ct_sm, saved in a temp folder."""
    from totalsegmentator.map_to_binary import class_map

    from common.imaging.volume import load_volume

    scan = load_volume(example_ct_sm)
    seg = load_volume(example_seg).image
    labels = np.asarray(seg.dataobj)
    passport = build_passport(labels, seg.affine, class_map["total"], scan=scan_metadata(example_ct_sm, scan.image),
                              model={"name": "TotalSegmentator total (official example_seg)"}, resolution="original")
    return save_passport(passport, tmp_path_factory.mktemp("real") / "example_passport.json")


def test_real_label_map(real_passport, example_seg):
    labels = np.asarray(nib.load(example_seg).dataobj)
    passport = load_passport(real_passport)
    present = np.unique(labels[labels > 0])
    assert [s.label for s in passport.structures] == present.tolist()
    assert sum(s.voxel_count for s in passport.structures) == int((labels > 0).sum())
    names = structure_by_name(passport)
    assert "liver" in names and "vertebrae_L1" in names
    # RAS+: the liver (patient's right) has a larger world x than the spleen (patient's left)
    assert names["liver"].centroid_mm[0] > names["spleen"].centroid_mm[0] + 100


@pytest.mark.parametrize("script", ["08_visualize_passport.py", "09_visualize_spine.py"])
def test_visualisation_scripts_write_png(real_passport, tmp_path, script):
    module = load_script(script)
    out = tmp_path / f"{script}.png"
    assert module.main(["--passport", str(real_passport), "--out", str(out)]) == 0
    image = mpimg.imread(out)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200 and image.shape[2] in (3, 4)
    assert not list(tmp_path.glob(".tmp-*"))


def test_default_output_path_is_next_to_the_passport(real_passport):
    module = load_script("08_visualize_passport.py")
    assert module.default_out(real_passport) == real_passport.with_name("example_passport_passport.png")


@pytest.mark.parametrize("script", ["08_visualize_passport.py", "09_visualize_spine.py"])
def test_visualisation_scripts_report_bad_input(tmp_path, capsys, script):
    module = load_script(script)
    missing = tmp_path / "nope.json"
    assert module.main(["--passport", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("script", ["08_visualize_passport.py", "09_visualize_spine.py"])
def test_visualisation_scripts_report_a_missing_scan(real_passport, tmp_path, capsys, script):
    missing = tmp_path / "no_scan.nii.gz"
    assert load_script(script).main(["--passport", str(real_passport), "--scan", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1 and "Traceback" not in err


def test_spine_chain_is_ordered_anatomically():
    module = load_script("09_visualize_spine.py")
    names = ["sacrum", "vertebrae_L1", "liver", "vertebrae_C7", "vertebrae_T10", "vertebrae_S1", "vertebrae_T2"]
    chain = module.spine_chain([SimpleNamespace(name=n) for n in names])
    assert [s.name for s in chain] == ["vertebrae_C7", "vertebrae_T2", "vertebrae_T10", "vertebrae_L1",
                                          "vertebrae_S1", "sacrum"]


def test_spine_script_without_vertebrae(tmp_path, capsys, example_ct_sm):
    labels, affine = ellipsoid_volume("anisotropic_ras")
    passport = passport_for(labels, affine, tmp_path, max_points=5)
    path = save_passport(passport, tmp_path / "egg.json")
    module = load_script("09_visualize_spine.py")
    assert module.main(["--passport", str(path), "--scan", str(example_ct_sm)]) == 2
    err = capsys.readouterr().err
    assert "vertebrae" in err and err.count("\n") == 1


def test_scripts_run_from_the_command_line(real_passport, tmp_path):
    import subprocess

    out = tmp_path / "cli.png"
    done = subprocess.run([sys.executable, "09_visualize_spine.py", "--passport", str(real_passport), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 1000
