"""Synthetic CT phantom: geometry, determinism, HU ranges, labels, sides (vs the real example CT), I/O.

Arrays are nibabel (x, y, z); world coordinates are mm RAS+. Most tests use a coarse grid over the
default field of view (fast); one builds the full clinical size once.
"""
from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from common.core.atomic import leftover_temp_files
from common.imaging.labels import total_class_ids
from common.sources.phantom import (
    BODY_SEMI_AXES_MM,
    DEFAULT_FOV_MM,
    VERTEBRA_PERIOD_MM,
    make_phantom,
    phantom_label_names,
    vertebra_centre_z,
    write_phantom,
)

COARSE = (2.5, 2.5, 3.0)  # mm; default FOV -> 128 x 112 x 100 voxels

CORE_ML = {  # structure -> plausible volume range (ml) in the default field of view
    "liver": (600, 1500),
    "spleen": (100, 300),
    "kidney_left": (80, 200),
    "kidney_right": (80, 200),
    "aorta": (40, 150),
    "heart": (250, 700),
    "lung_upper_lobe_left": (200, 1000),
    "lung_lower_lobe_left": (200, 1000),
    "lung_upper_lobe_right": (150, 1000),
    "lung_middle_lobe_right": (150, 1000),
    "lung_lower_lobe_right": (150, 1000),
}


@pytest.fixture(scope="module")
def coarse():
    ct, lab = make_phantom(spacing=COARSE, seed=0)
    return ct, lab, np.asarray(ct.dataobj), np.asarray(lab.dataobj)


def _ids() -> dict[str, int]:
    return total_class_ids()


def _voxel_ml(img) -> float:
    return float(np.prod(img.header.get_zooms()[:3])) / 1000.0


def _centroid_mm(labels: np.ndarray, affine: np.ndarray, ids) -> np.ndarray:
    idx = np.argwhere(np.isin(labels, list(ids)))
    assert len(idx), f"labels {ids} absent"
    return apply_affine(affine, idx.mean(axis=0))


def test_shapes_affine_dtypes(coarse):
    ct, lab, c, lbl = coarse
    assert ct.shape == lab.shape == (128, 112, 100)
    assert np.array_equal(ct.affine, lab.affine)
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    assert np.allclose(np.diag(ct.affine)[:3], COARSE)
    centre = apply_affine(ct.affine, (np.asarray(ct.shape) - 1) / 2.0)
    assert np.allclose(centre, 0.0)
    assert c.dtype == np.int16 and lbl.dtype == np.uint8
    assert ct.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert int(ct.header["sform_code"]) == 1 and int(ct.header["qform_code"]) == 1


def test_deterministic():
    kw = dict(spacing=(4.0, 4.0, 5.0), fov_mm=(320, 260, 200))
    ct1, lab1 = make_phantom(seed=3, **kw)
    ct2, lab2 = make_phantom(seed=3, **kw)
    ct3, lab3 = make_phantom(seed=4, **kw)
    assert np.array_equal(ct1.dataobj, ct2.dataobj)
    assert np.array_equal(lab1.dataobj, lab2.dataobj)
    assert not np.array_equal(ct1.dataobj, ct3.dataobj)  # noise depends on the seed
    assert np.array_equal(lab1.dataobj, lab3.dataobj)  # anatomy does not


def test_hu_ranges(coarse):
    ct, _, c, lbl = coarse
    ids = _ids()

    def median(*names):
        return float(np.median(c[np.isin(lbl, [ids[n] for n in names])]))

    assert 30 <= median("liver") <= 90
    assert 30 <= median("spleen") <= 90
    assert 10 <= median("kidney_left", "kidney_right") <= 70
    assert median("aorta") > 120
    lungs = [n for n in ids if n.startswith("lung_")]
    assert median(*lungs) < -700
    bones = [n for n in ids if n.startswith(("vertebrae_", "rib_"))]
    assert median(*bones) > 200
    assert median(*[n for n in ids if n.startswith("rib_")]) > 200
    # outside the body outline (elliptic cylinder along z): air
    x = apply_affine(ct.affine, np.c_[np.arange(ct.shape[0]), np.zeros((ct.shape[0], 2))])[:, 0]
    y = apply_affine(ct.affine, np.c_[np.zeros(ct.shape[1]), np.arange(ct.shape[1]), np.zeros(ct.shape[1])])[:, 1]
    a, b = BODY_SEMI_AXES_MM
    outside = (x[:, None] / a) ** 2 + (y[None, :] / b) ** 2 > 1.15
    air = c[outside, :]
    assert np.median(air) < -900 and np.percentile(air, 99) < -900
    assert c.min() >= -1024


def test_labels_present_with_plausible_volume(coarse):
    ct, lab, _, lbl = coarse
    ids = _ids()
    present = phantom_label_names(lab)
    assert set(present.values()) <= set(ids)  # every name is a TotalSegmentator 'total' class
    counts = np.bincount(lbl.ravel(), minlength=256)
    ml = {name: counts[i] * _voxel_ml(lab) for i, name in present.items()}
    for name, (lo, hi) in CORE_ML.items():
        assert name in ml, f"{name} not drawn"
        assert lo <= ml[name] <= hi, f"{name}: {ml[name]:.0f} ml"
    z_lo, z_hi = -DEFAULT_FOV_MM[2] / 2, DEFAULT_FOV_MM[2] / 2
    # vertebrae: every level whose body centre is in the field of view, nothing else
    expected_v = {f"vertebrae_{v}" for v in [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)] + ["S1"]
                  if z_lo <= vertebra_centre_z(v) <= z_hi}
    got_v = {n for n in ml if n.startswith("vertebrae_")}
    assert expected_v <= got_v and len(expected_v) >= 10
    for n in got_v:
        full = vertebra_centre_z(n.split("_")[1])
        if z_lo + VERTEBRA_PERIOD_MM / 2 <= full <= z_hi - VERTEBRA_PERIOD_MM / 2:
            assert 15 <= ml[n] <= 80, f"{n}: {ml[n]:.1f} ml"
    # ribs: pairs, both sides alike; those attached to a vertebra inside the field of view are whole
    for n in range(1, 13):
        left, right = ml.get(f"rib_left_{n}", 0.0), ml.get(f"rib_right_{n}", 0.0)
        assert left == pytest.approx(right, rel=0.1, abs=0.5)
        if z_lo + 10 <= vertebra_centre_z(f"T{n}") <= z_hi - 10:
            assert 4 <= left <= 40, f"rib {n}: {left:.1f} ml"
    assert sum(n.startswith("rib_") for n in ml) >= 12
    unexpected = set(ml) - set(CORE_ML) - got_v - {n for n in ml if n.startswith("rib_")}
    assert unexpected == set()


def test_sides_agree_with_real_ct(coarse, example_seg):
    """Liver/spleen, kidney and spine/aorta sides in world RAS+ mm, as in the real example CT."""
    ids = _ids()
    real = nib.load(str(example_seg))
    real_lbl = np.asarray(real.dataobj)
    ct, _, _, lbl = coarse
    names = {
        "liver": [ids["liver"]],
        "spleen": [ids["spleen"]],
        "kidney_right": [ids["kidney_right"]],
        "kidney_left": [ids["kidney_left"]],
        "aorta": [ids["aorta"]],
        "vertebrae": [i for n, i in ids.items() if n.startswith("vertebrae_")],
    }
    r = {k: _centroid_mm(real_lbl, real.affine, v) for k, v in names.items()}
    p = {k: _centroid_mm(lbl, ct.affine, v) for k, v in names.items()}
    # left-right (x): liver vs spleen, right vs left kidney
    assert np.sign(r["liver"][0] - r["spleen"][0]) == np.sign(p["liver"][0] - p["spleen"][0]) != 0
    assert np.sign(r["kidney_right"][0] - r["kidney_left"][0]) == np.sign(p["kidney_right"][0] - p["kidney_left"][0])
    # anterior-posterior (y): spine behind the aorta
    assert np.sign(r["vertebrae"][1] - r["aorta"][1]) == np.sign(p["vertebrae"][1] - p["aorta"][1]) != 0
    # and RAS+ as documented: patient right = +x, posterior = -y
    assert p["liver"][0] > 0 > p["spleen"][0] and r["liver"][0] > r["spleen"][0]
    assert p["vertebrae"][1] < p["aorta"][1]


def test_small_fov_crops_the_same_anatomy(coarse):
    _, _, _, big = coarse
    ct, lab = make_phantom(shape=(48, 40, 20), spacing=COARSE)
    small = np.asarray(lab.dataobj)
    off = [(b - s) // 2 for b, s in zip(big.shape, small.shape, strict=True)]
    assert np.array_equal(small, big[off[0]:off[0] + 48, off[1]:off[1] + 40, off[2]:off[2] + 20])
    assert set(phantom_label_names(lab).values()) <= set(_ids())
    assert ct.shape == (48, 40, 20)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_phantom(shape=(10, 10, 10), fov_mm=(10, 10, 10))
    with pytest.raises(ValueError):
        make_phantom(spacing=(1.0, 0.0, 1.0))


def test_write_phantom(tmp_path):
    ct_path, lab_path = write_phantom(tmp_path / "out", name="ph", spacing=(4.0, 4.0, 5.0), seed=1)
    assert ct_path.name == "ph.nii.gz" and lab_path.name == "ph_labels.nii.gz"
    ct, lab = nib.load(str(ct_path)), nib.load(str(lab_path))
    ref_ct, ref_lab = make_phantom(spacing=(4.0, 4.0, 5.0), seed=1)
    assert np.array_equal(np.asarray(ct.dataobj), np.asarray(ref_ct.dataobj))
    assert np.array_equal(np.asarray(lab.dataobj), np.asarray(ref_lab.dataobj))
    assert ct.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert np.allclose(ct.affine, lab.affine)
    assert leftover_temp_files(tmp_path) == []


def test_default_is_clinical_size():
    t0 = time.perf_counter()
    ct, lab = make_phantom()
    elapsed = time.perf_counter() - t0
    assert elapsed < 15.0, f"full-size phantom took {elapsed:.1f} s"
    assert ct.shape == lab.shape
    assert ct.shape[0] >= 350 and ct.shape[1] >= 350 and ct.shape[2] >= 150
    assert np.allclose(ct.header.get_zooms()[:3], (0.8, 0.8, 1.5))
    assert ct.shape == (400, 350, 200)
    names = set(phantom_label_names(lab).values())
    assert set(CORE_ML) <= names
