"""Anatomical passports: analytic ellipsoids on non-identity grids, fragmented maps against a slow reference."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from helpers.passport_cases import CENTRE_MM, ELLIPSOID_ROT, GRIDS, SEMI_AXES_MM, ellipsoid_volume
from scipy import ndimage

from common.records.passport import build_passport, compute_structures


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
    assert s.label == 7 and s.name == "egg"
    assert s.voxel_count == int((labels == 7).sum())

    # centroid within half a voxel along every voxel axis
    err_vox = np.linalg.solve(affine[:3, :3], np.array(s.centroid_mm) - CENTRE_MM)
    assert np.all(np.abs(err_vox) < 0.5), (grid, err_vox)

    # volume within 2 %
    expected_volume = 4.0 / 3.0 * np.pi * SEMI_AXES_MM.prod()
    assert s.volume_mm3 == pytest.approx(expected_volume, rel=0.02)
    assert s.volume_mm3 == pytest.approx(s.voxel_count * abs(np.linalg.det(affine[:3, :3])))

    # eigen decomposition: ascending, columns are eigenvectors, second moments of a solid ellipsoid a^2/5
    cov = np.array(s.covariance_mm2)
    vals, vecs = np.array(s.eigenvalues_mm2), np.array(s.eigenvectors)
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
    assert s.bbox_voxel.min.tolist() == mask_idx.min(axis=0).tolist()
    assert s.bbox_voxel.max.tolist() == mask_idx.max(axis=0).tolist()
    centres = mask_idx @ affine[:3, :3].T + affine[:3, 3]
    assert np.all(centres >= np.array(s.bbox_mm.min) - 1e-9)
    assert np.all(centres <= np.array(s.bbox_mm.max) + 1e-9)


def test_boundary_points_lie_on_the_surface(ellipsoid):
    grid, labels, affine = ellipsoid
    mask = labels == 7
    surface = mask & ~ndimage.binary_erosion(np.pad(mask, 1), ndimage.generate_binary_structure(3, 1))[1:-1, 1:-1, 1:-1]
    for max_points in (200, 10**9):
        (s,) = compute_structures(labels, affine, {}, max_points=max_points)
        assert s.name == "label_7"
        assert s.n_boundary_voxels == int(surface.sum())
        points = np.array(s.boundary_points_mm)
        assert len(points) == min(max_points, s.n_boundary_voxels)
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
    assert (s2.label, s3.label) == (2, 3)
    assert s3.n_boundary_voxels == 24  # a 2-voxel-thick block is all boundary
    assert s2.n_boundary_voxels == s2.voxel_count  # the shell is one voxel thick everywhere
    assert s2.voxel_count + s3.voxel_count == labels.size
    np.testing.assert_allclose(s3.centroid_mm, [1.5, 2.0, 2.5])


def test_multiple_labels_sorted_and_cropped_independently():
    a, affine = ellipsoid_volume("anisotropic_ras", label=9)
    labels = a.copy()
    labels[:6, :6, :6] = 2  # a cube in a corner, overlapping nothing of the ellipsoid
    structures = compute_structures(labels, affine, {2: "cube", 9: "egg"})
    assert [s.label for s in structures] == [2, 9]
    assert structures[0].voxel_count == 216
    (alone,) = compute_structures(a, affine, {9: "egg"})
    assert structures[1] == alone


def test_determinism_and_max_points():
    labels, affine = ellipsoid_volume("oblique")
    runs = [build_passport(labels, affine, {7: "egg"}, scan={}, model={}, resolution="model", max_points=37)
            for _ in range(2)]
    docs = [run.to_json() for run in runs]
    for doc in docs:
        doc.pop("timing_s")
    assert docs[0] == docs[1] and runs[0].structures == runs[1].structures
    (s,) = runs[0].structures
    assert len(s.boundary_points_mm) == 37 < s.n_boundary_voxels
    (none,) = compute_structures(labels, affine, {}, max_points=0)
    assert none.to_json()["boundary_points_mm"] == [] and none.n_boundary_voxels == s.n_boundary_voxels


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
    assert [s.label for s in got] == [r["label"] for r in want]
    assert any(len(r["boundary_vox"]) < r["n_boundary"] for r in want) == (max_points < 10**6)
    inv = np.linalg.inv(affine[:3, :3])
    for s, r in zip(got, want, strict=True):
        assert s.name == ("sparse" if r["label"] == 250 else f"label_{r['label']}")
        assert s.voxel_count == r["voxel_count"] and s.n_boundary_voxels == r["n_boundary"]
        assert s.bbox_voxel.to_json() == {"min": r["bbox_min"].tolist(), "max": r["bbox_max"].tolist()}
        # boundary points: the same voxels in the same order, at their centres in mm
        points = np.array(s.boundary_points_mm).reshape(-1, 3)
        vox = (points - affine[:3, 3]) @ inv.T
        np.testing.assert_allclose(vox, np.rint(vox), atol=1e-9)
        np.testing.assert_array_equal(np.rint(vox).astype(int), r["boundary_vox"])
        np.testing.assert_allclose(points, r["boundary_vox"] @ affine[:3, :3].T + affine[:3, 3], rtol=0, atol=1e-9)
        np.testing.assert_allclose(s.centroid_mm, r["centroid_mm"], rtol=0, atol=1e-9)
        cov = np.array(s.covariance_mm2)
        np.testing.assert_allclose(cov, r["covariance_mm2"], rtol=0, atol=1e-9 * np.abs(cov).max())
        vals, vecs = np.array(s.eigenvalues_mm2), np.array(s.eigenvectors)
        np.testing.assert_allclose(vals, np.linalg.eigvalsh(r["covariance_mm2"]), rtol=0, atol=1e-9 * vals.max())
        np.testing.assert_allclose(cov @ vecs, vecs * vals, atol=1e-9 * vals.max())


def test_empty_and_bad_label_maps():
    assert compute_structures(np.zeros((3, 3, 3), dtype=np.uint8), np.eye(4), {}) == []
    with pytest.raises(ValueError):
        compute_structures(np.zeros((3, 3), dtype=np.uint8), np.eye(4), {})
    with pytest.raises(ValueError):
        compute_structures(np.full((3, 3, 3), 0.5), np.eye(4), {})
    (s,) = compute_structures(np.ones((2, 2, 2)), np.eye(4), {1: "one"})  # integral floats are fine
    assert s.voxel_count == 8
