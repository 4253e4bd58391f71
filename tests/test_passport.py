"""Anatomical passports: analytic ellipsoids on non-identity grids, real anatomy, the two picture scripts."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.errors import InputError
from common.passport import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    build_passport,
    compute_structures,
    load_passport,
    save_passport,
    scan_metadata,
    structure_by_name,
)

ROOT = Path(__file__).resolve().parents[1]


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix Rz(az) @ Ry(ay) @ Rx(ax), angles in degrees."""
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


CENTRE_MM = np.array([12.3, -40.7, 85.2])
SEMI_AXES_MM = np.array([26.0, 16.0, 10.0])
ELLIPSOID_ROT = rotation(30.0, -20.0, 40.0)  # columns: world directions of the three semi-axes

GRIDS = {
    # name: (3x3 direction cosines (columns = voxel axes in world), spacing mm per voxel axis)
    "anisotropic_ras": (np.eye(3), np.array([0.8, 1.1, 2.0])),
    "lps": (np.diag([-1.0, -1.0, 1.0]), np.array([0.9, 0.9, 1.5])),
    "oblique": (rotation(15.0, -10.0, 25.0), np.array([1.0, 1.2, 1.5])),
}


def ellipsoid_volume(grid: str, label: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise the analytic ellipsoid on a grid; return (x, y, z) labels and the voxel->mm affine.

    The grid centre sits a fraction of a voxel away from the ellipsoid centre so nothing is symmetric.
    """
    directions, spacing = GRIDS[grid]
    lin = directions * spacing[None, :]
    radius = SEMI_AXES_MM.max() + 3 * spacing.max()
    shape = np.ceil(2 * radius / spacing).astype(int) + 1
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = CENTRE_MM - lin @ ((shape - 1) / 2 + np.array([0.31, -0.27, 0.43]))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ lin.T + affine[:3, 3]
    local = (world - CENTRE_MM) @ ELLIPSOID_ROT  # coordinates along the ellipsoid's own axes
    inside = (((local / SEMI_AXES_MM) ** 2).sum(axis=1) <= 1.0).reshape(shape)
    return np.where(inside, label, 0).astype(np.uint8), affine


def angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    """Angle between two directions, ignoring sign, in degrees."""
    c = abs(float(np.dot(u, v))) / (np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.degrees(np.arccos(min(c, 1.0))))


@pytest.fixture(scope="module", params=sorted(GRIDS))
def ellipsoid(request):
    labels, affine = ellipsoid_volume(request.param)
    return request.param, labels, affine


def test_grid_affines_are_what_they_claim():
    assert "".join(nib.aff2axcodes(ellipsoid_volume("lps")[1])) == "LPS"
    oblique = ellipsoid_volume("oblique")[1][:3, :3]
    assert not np.allclose(oblique, np.diag(np.diag(oblique)))


def test_ellipsoid_analytic_geometry(ellipsoid):
    grid, labels, affine = ellipsoid
    (s,) = compute_structures(labels, affine, {7: "egg"})
    assert s["label"] == 7 and s["name"] == "egg"
    assert s["voxel_count"] == int((labels == 7).sum())

    # centroid within half a voxel along every voxel axis
    err_vox = np.linalg.solve(affine[:3, :3], np.array(s["centroid_mm"]) - CENTRE_MM)
    assert np.all(np.abs(err_vox) < 0.5), (grid, err_vox)

    # volume within 2 %
    expected_volume = 4.0 / 3.0 * np.pi * SEMI_AXES_MM.prod()
    assert s["volume_mm3"] == pytest.approx(expected_volume, rel=0.02)
    assert s["volume_mm3"] == pytest.approx(s["voxel_count"] * abs(np.linalg.det(affine[:3, :3])))

    # eigen decomposition: ascending, columns are eigenvectors, second moments of a solid ellipsoid a^2/5
    cov = np.array(s["covariance_mm2"])
    vals, vecs = np.array(s["eigenvalues_mm2"]), np.array(s["eigenvectors"])
    assert np.all(np.diff(vals) > 0)
    np.testing.assert_allclose(cov @ vecs, vecs * vals[None, :], atol=1e-8 * vals.max())
    np.testing.assert_allclose(vals, np.sort(SEMI_AXES_MM**2 / 5.0), rtol=0.05)
    # largest eigenvalue <-> longest semi-axis (column 0 of the rotation), smallest <-> shortest (column 2)
    assert angle_deg(vecs[:, 2], ELLIPSOID_ROT[:, 0]) < 2.0, grid
    assert angle_deg(vecs[:, 0], ELLIPSOID_ROT[:, 2]) < 2.0, grid
    # deterministic sign: each column's largest-|component| entry is positive
    assert np.all(vecs[np.argmax(np.abs(vecs), axis=0), np.arange(3)] > 0)

    # bounding boxes
    mask_idx = np.argwhere(labels == 7)
    assert s["bbox_voxel"]["min"] == mask_idx.min(axis=0).tolist()
    assert s["bbox_voxel"]["max"] == mask_idx.max(axis=0).tolist()
    centres = mask_idx @ affine[:3, :3].T + affine[:3, 3]
    assert np.all(centres >= np.array(s["bbox_mm"]["min"]) - 1e-9)
    assert np.all(centres <= np.array(s["bbox_mm"]["max"]) + 1e-9)


def test_boundary_points_lie_on_the_surface(ellipsoid):
    grid, labels, affine = ellipsoid
    mask = labels == 7
    surface = mask & ~ndimage.binary_erosion(np.pad(mask, 1), ndimage.generate_binary_structure(3, 1))[1:-1, 1:-1, 1:-1]
    for max_points in (200, 10**9):
        (s,) = compute_structures(labels, affine, {}, max_points=max_points)
        assert s["name"] == "label_7"
        assert s["n_boundary_voxels"] == int(surface.sum())
        points = np.array(s["boundary_points_mm"])
        assert len(points) == min(max_points, s["n_boundary_voxels"])
        vox = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
        ijk = np.rint(vox).astype(int)
        np.testing.assert_allclose(vox, ijk, atol=1e-6)
        assert np.all(surface[tuple(ijk.T)]), grid
        assert len(np.unique(ijk, axis=0)) == len(ijk)
    # with no limit every boundary voxel is listed exactly once
    assert {tuple(v) for v in ijk} == {tuple(v) for v in np.argwhere(surface)}


def test_structures_touching_the_array_edge_get_boundary():
    labels = np.zeros((4, 5, 6), dtype=np.int16)
    labels[:, :, :] = 2  # fills the whole array: every voxel on an array face is boundary
    labels[1:3, 1:4, 1:5] = 3  # interior 2x3x4 block: too thin to have interior voxels
    s2, s3 = compute_structures(labels, np.eye(4), {2: "shell", 3: "block"})
    assert (s2["label"], s3["label"]) == (2, 3)
    assert s3["n_boundary_voxels"] == 24  # a 2-voxel-thick block is all boundary
    assert s2["n_boundary_voxels"] == s2["voxel_count"]  # the shell is one voxel thick everywhere
    assert s2["voxel_count"] + s3["voxel_count"] == labels.size
    np.testing.assert_allclose(s3["centroid_mm"], [1.5, 2.0, 2.5])


def test_multiple_labels_sorted_and_cropped_independently():
    a, affine = ellipsoid_volume("anisotropic_ras", label=9)
    labels = a.copy()
    labels[:6, :6, :6] = 2  # a cube in a corner, overlapping nothing of the ellipsoid
    structures = compute_structures(labels, affine, {2: "cube", 9: "egg"})
    assert [s["label"] for s in structures] == [2, 9]
    assert structures[0]["voxel_count"] == 216
    (alone,) = compute_structures(a, affine, {9: "egg"})
    assert structures[1] == alone


def test_determinism_and_max_points():
    labels, affine = ellipsoid_volume("oblique")
    runs = [build_passport(labels, affine, {7: "egg"}, scan={}, model={}, resolution="model", max_points=37)
            for _ in range(2)]
    for run in runs:
        run.pop("timing_s")
    assert runs[0] == runs[1]
    (s,) = runs[0]["structures"]
    assert len(s["boundary_points_mm"]) == 37 < s["n_boundary_voxels"]
    (none,) = compute_structures(labels, affine, {}, max_points=0)
    assert none["boundary_points_mm"] == [] and none["n_boundary_voxels"] == s["n_boundary_voxels"]


def reference_structures(labels: np.ndarray, affine: np.ndarray, max_points: int) -> list[dict]:
    """The obvious slow way: a full-volume mask per label, binary_erosion for the boundary, np.argwhere."""
    lin, shift = affine[:3, :3], affine[:3, 3]
    face = ndimage.generate_binary_structure(3, 1)
    out = []
    for label in np.unique(labels[labels > 0]).tolist():
        mask = labels == label
        idx = np.argwhere(mask)  # C order of (x, y, z)
        boundary = np.argwhere(mask & ~ndimage.binary_erosion(mask, face, border_value=0))
        n = len(boundary)
        keep = np.arange(n) if n <= max_points else (np.arange(max_points) * n) // max_points
        world = idx @ lin.T + shift
        out.append({"label": label, "voxel_count": len(idx), "centroid_mm": world.mean(axis=0),
                    "covariance_mm2": np.cov(world.T, bias=True), "bbox_min": idx.min(axis=0),
                    "bbox_max": idx.max(axis=0), "boundary_vox": boundary[keep], "n_boundary": n})
    return out


def fragmented_labels(seed: int, shape=(15, 12, 10), n_labels: int = 8) -> np.ndarray:
    """Argmax of smoothed noise: every label scattered in many pieces over the whole volume."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(n_labels + 1, *shape)), sigma=(0, 0.8, 0.8, 0.8))
    return np.argmax(field, axis=0)


@pytest.mark.parametrize("dtype, max_points, pad", [(np.uint8, 10**6, 0), (np.int16, 7, 3), (np.int64, 0, 1)])
def test_matches_per_label_reference_on_fragmented_map(dtype, max_points, pad):
    labels = fragmented_labels(seed=max_points)
    labels[labels == 3] = 250  # sparse label values
    labels = np.pad(labels, pad)  # background margin (crop path) when pad > 0
    if np.issubdtype(dtype, np.signedinteger):
        labels[labels == 5] = -4  # negative values are no structure, like background
    labels = labels.astype(dtype)
    _, affine = ellipsoid_volume("oblique")
    got = compute_structures(labels, affine, {250: "sparse"}, max_points=max_points)
    want = reference_structures(labels, affine, max_points)
    assert [s["label"] for s in got] == [r["label"] for r in want]
    assert any(len(r["boundary_vox"]) < r["n_boundary"] for r in want) == (max_points < 10**6)
    inv = np.linalg.inv(affine[:3, :3])
    for s, r in zip(got, want, strict=True):
        assert s["name"] == ("sparse" if r["label"] == 250 else f"label_{r['label']}")
        assert s["voxel_count"] == r["voxel_count"] and s["n_boundary_voxels"] == r["n_boundary"]
        assert s["bbox_voxel"] == {"min": r["bbox_min"].tolist(), "max": r["bbox_max"].tolist()}
        # boundary points: the same voxels in the same order, at their centres in mm
        points = np.array(s["boundary_points_mm"]).reshape(-1, 3)
        vox = (points - affine[:3, 3]) @ inv.T
        np.testing.assert_allclose(vox, np.rint(vox), atol=1e-9)
        np.testing.assert_array_equal(np.rint(vox).astype(int), r["boundary_vox"])
        np.testing.assert_allclose(points, r["boundary_vox"] @ affine[:3, :3].T + affine[:3, 3], rtol=0, atol=1e-9)
        np.testing.assert_allclose(s["centroid_mm"], r["centroid_mm"], rtol=0, atol=1e-9)
        cov = np.array(s["covariance_mm2"])
        np.testing.assert_allclose(cov, r["covariance_mm2"], rtol=0, atol=1e-9 * np.abs(cov).max())
        vals, vecs = np.array(s["eigenvalues_mm2"]), np.array(s["eigenvectors"])
        np.testing.assert_allclose(vals, np.linalg.eigvalsh(r["covariance_mm2"]), rtol=0, atol=1e-9 * vals.max())
        np.testing.assert_allclose(cov @ vecs, vecs * vals, atol=1e-9 * vals.max())


def test_empty_and_bad_label_maps():
    assert compute_structures(np.zeros((3, 3, 3), dtype=np.uint8), np.eye(4), {}) == []
    with pytest.raises(ValueError):
        compute_structures(np.zeros((3, 3), dtype=np.uint8), np.eye(4), {})
    with pytest.raises(ValueError):
        compute_structures(np.full((3, 3, 3), 0.5), np.eye(4), {})
    (s,) = compute_structures(np.ones((2, 2, 2)), np.eye(4), {1: "one"})  # integral floats are fine
    assert s["voxel_count"] == 8


def passport_for(labels, affine, tmp_path: Path, **kwargs) -> dict:
    scan_file = tmp_path / "scan.nii.gz"
    img = nib.Nifti1Image(labels.astype(np.int16), affine)
    nib.save(img, scan_file)
    return build_passport(labels, affine, {7: "egg"}, scan=scan_metadata(scan_file, img),
                          model={"name": "test"}, resolution="original", **kwargs)


def test_passport_layout_and_round_trip(tmp_path):
    labels, affine = ellipsoid_volume("lps")
    passport = passport_for(labels, affine, tmp_path, max_points=50)
    assert passport["schema"] == SCHEMA_NAME and passport["schema_version"] == SCHEMA_VERSION
    assert passport["grid"]["orientation"] == "LPS" and passport["grid"]["shape"] == list(labels.shape)
    np.testing.assert_allclose(passport["grid"]["spacing_mm"], [0.9, 0.9, 1.5])
    assert passport["scan"]["orientation"] == "LPS" and len(passport["scan"]["sha256"]) == 64
    assert passport["timing_s"] >= 0
    path = save_passport(passport, tmp_path / "out" / "p.json")
    assert load_passport(path) == json.loads(json.dumps(passport))
    assert load_passport(path) == passport
    assert structure_by_name(load_passport(path))["egg"]["label"] == 7
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
    passport = passport_for(labels, affine, tmp_path, max_points=5)
    mutate(passport)
    path = save_passport(passport, tmp_path / "bad.json")
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

    from common.volume import load_volume

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
    assert [s["label"] for s in passport["structures"]] == present.tolist()
    assert sum(s["voxel_count"] for s in passport["structures"]) == int((labels > 0).sum())
    names = structure_by_name(passport)
    assert "liver" in names and "vertebrae_L1" in names
    # RAS+: the liver (patient's right) has a larger world x than the spleen (patient's left)
    assert names["liver"]["centroid_mm"][0] > names["spleen"]["centroid_mm"][0] + 100


def load_script(filename: str):
    """Import a numbered script (its name is not a valid module name) as a module."""
    spec = importlib.util.spec_from_file_location("script_" + filename.removesuffix(".py"), ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    chain = module.spine_chain({"structures": [{"name": n} for n in names]})
    assert [s["name"] for s in chain] == ["vertebrae_C7", "vertebrae_T2", "vertebrae_T10", "vertebrae_L1",
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
