"""Anatomical passports: per-structure geometry of a label map, in world millimetres.

A passport summarises an (x, y, z) integer label map (nibabel axis order) whose affine maps voxel
indices to world coordinates in mm, RAS+. For every label present it stores the voxel count and
volume, the centroid, the covariance of the voxel centres with its principal axes, bounding boxes
and a deterministic subsample of boundary voxel centres. In memory a passport is typed, with numpy arrays
(common.records.passport_model: Passport, Grid, Structure); it becomes JSON only in save_passport / load_passport.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.core.atomic import atomic_write_json
from common.core.errors import InputError
from common.imaging.geometry import even_indices, voxel_to_world
from common.imaging.labels import as_label_array
from common.records.passport_model import WORLD_FRAME, Box, Grid, Passport, Structure

RESOLUTIONS = ("model", "original")

# The 8 corners of a box as 0/1 choices of (min, max) per axis, shape (8, 3).
_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
# Voxels per chunk of whole x-slices in _moment_sums: bounds its temporaries to a few tens of MB.
_CHUNK_VOXELS = 1 << 20


def canonical_eigenvectors(vectors: np.ndarray) -> np.ndarray:
    """Flip eigenvector columns of (..., 3, 3) so each column's largest-|component| entry is positive."""
    vectors = np.asarray(vectors, dtype=np.float64)
    idx = np.argmax(np.abs(vectors), axis=-2)[..., None, :]
    signs = np.sign(np.take_along_axis(vectors, idx, axis=-2))
    signs[signs == 0] = 1.0
    return vectors * signs


def _boundary_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean (x, y, z) mask of voxels having a 6-neighbour of another label, or lying on an array face.

    For a voxel of label L this equals ``mask & ~binary_erosion(mask)`` of ``mask = labels == L``
    with 6-connectivity and everything outside the array counted as outside the structure, so one
    pass gives the boundary of every label at once.
    """
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        lab = np.moveaxis(labels, axis, 0)
        bnd = np.moveaxis(boundary, axis, 0)  # a view: writes land in ``boundary``
        differs = lab[1:] != lab[:-1]
        bnd[1:] |= differs
        bnd[:-1] |= differs
        bnd[0] = bnd[-1] = True
    return boundary


def _moment_sums(labels: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact sums of voxel indices per label: counts (m,), sums (m, 3) and product sums (m, 3, 3), int64.

    ``labels`` is a C-contiguous (x, y, z) map of non-negative labels; ``lut`` maps a label value to
    its row 0..m-1. Index (x, y, z) sums are in voxel units. The map is read in chunks of whole
    x-slices: one bincount per chunk and weight gives, per (slice, row), the count and the sums of y,
    z, y^2, z^2 and y*z; x is constant on a slice, so the x moments follow from the counts and the
    y and z sums. The weights are small integers, so the float64 bincount sums are exact.
    """
    nx, ny, nz = labels.shape
    m = int(lut.max()) + 1
    plane = ny * nz
    step = max(1, min(_CHUNK_VOXELS // plane, _CHUNK_VOXELS // m, nx))
    y, z = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nz, dtype=np.float64), indexing="ij")
    # weights per voxel of a chunk of ``step`` slices: y, z, y^2, z^2, y*z (C order, x slowest)
    weights = [np.tile(w.ravel(), step) for w in (y, z, y * y, z * z, y * z)]
    count = np.zeros(m, dtype=np.int64)
    s1 = np.zeros((m, 3), dtype=np.int64)
    s2 = np.zeros((m, 3, 3), dtype=np.int64)
    for x0 in range(0, nx, step):
        n_slices = min(step, nx - x0)
        # bin of a voxel = row of its label + m * (its slice within the chunk)
        key = lut[labels[x0:x0 + n_slices].reshape(n_slices, plane)]
        key += (m * np.arange(n_slices, dtype=np.intp))[:, None]
        key = key.ravel()
        size, bins = key.size, n_slices * m
        c = np.bincount(key, minlength=bins).reshape(n_slices, m)
        sy, sz, syy, szz, syz = (np.rint(np.bincount(key, weights=w[:size], minlength=bins))
                                 .astype(np.int64).reshape(n_slices, m) for w in weights)
        x = np.arange(x0, x0 + n_slices, dtype=np.int64)[:, None]
        count += c.sum(axis=0)
        s1[:, 0] += (x * c).sum(axis=0)
        s1[:, 1] += sy.sum(axis=0)
        s1[:, 2] += sz.sum(axis=0)
        s2[:, 0, 0] += (x * x * c).sum(axis=0)
        s2[:, 0, 1] += (x * sy).sum(axis=0)
        s2[:, 0, 2] += (x * sz).sum(axis=0)
        s2[:, 1, 1] += syy.sum(axis=0)
        s2[:, 1, 2] += syz.sum(axis=0)
        s2[:, 2, 2] += szz.sum(axis=0)
    s2[:, 1, 0], s2[:, 2, 0], s2[:, 2, 1] = s2[:, 0, 1], s2[:, 0, 2], s2[:, 1, 2]
    return count, s1, s2


def compute_structures(labels: np.ndarray, affine: np.ndarray, label_names: Mapping[int, str],
                       max_points: int = 500) -> list[Structure]:
    """Geometry of every label > 0 present in an (x, y, z) label map, sorted by label id.

    ``affine`` maps voxel indices to world mm (RAS+). Units: mm, mm^2, mm^3; eigenvectors are the
    COLUMNS of a 3x3 matrix (world axes x, y, z by rows), eigenvalues ascending, each column's
    largest-|component| entry positive. Covariance is the population (1/n) covariance of voxel
    centres. bbox_voxel is inclusive; bbox_mm is the world axis-aligned box of the 8 corners of the
    index box, taken at the centres of the extreme voxels (like every other point here). Boundary
    voxels have a 6-neighbour outside the structure (outside the array counts as outside); they are
    listed in C order of (x, y, z) indices and subsampled to ``max_points`` at evenly spaced ranks.
    Labels missing from ``label_names`` are named "label_<id>".

    All labels are done together in a few passes over the box holding every structure (boundary
    mask, bincount moments, one stable sort of the boundary voxels by label), so the cost does not
    grow with how scattered the labels are: a fragmented map whose every label spans the whole
    volume costs about the same as a compact one.
    """
    labels = as_label_array(labels, ndim=3, negative_as_background=True)  # negative: no structure
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    lin = affine[:3, :3]
    voxel_volume = float(abs(np.linalg.det(lin)))

    objects = ndimage.find_objects(labels)  # index box of label i + 1, or None when absent
    present = np.array([i + 1 for i, s in enumerate(objects) if s is not None], dtype=np.int64)
    if present.size == 0:
        return []
    # Work on the box holding every structure (cropping off e.g. the air around a body). Outside it
    # all is background, so a structure voxel on the box face is boundary either way. Indices below
    # are relative to ``origin`` until they are mapped to mm.
    boxes = [objects[label - 1] for label in present]
    origin = np.array([min(b[axis].start for b in boxes) for axis in range(3)], dtype=np.int64)
    labels = labels[tuple(slice(int(origin[axis]), max(b[axis].stop for b in boxes)) for axis in range(3))]
    labels = np.ascontiguousarray(labels)
    # Row of each label value: 0 for background (and absent values), i + 1 for the i-th present label.
    lut = np.zeros(len(objects) + 1, dtype=np.intp)
    lut[present] = np.arange(1, present.size + 1)

    # Moments, exact in integers; the covariance (n*S2 - S1 S1^T) / n^2 in Python ints (object
    # arrays: no int64 overflow, no cancellation), rounded once to float.
    count, s1, s2 = (a[1:] for a in _moment_sums(labels, lut))
    n_obj = count.astype(object)
    centred = n_obj[:, None, None] * s2.astype(object) - s1.astype(object)[:, :, None] * s1.astype(object)[:, None, :]
    cov_vox = (centred / (n_obj * n_obj)[:, None, None]).astype(np.float64)
    mean_vox = s1 / count[:, None] + origin

    # Boundary voxels in C order, stably sorted by label: each label's run keeps C order.
    boundary_flat = np.flatnonzero(_boundary_mask(labels) & (labels > 0))
    rows = lut[labels.ravel()[boundary_flat]]
    if present.size < 2**16:
        rows = rows.astype(np.uint16)  # numpy sorts 16-bit keys stably with a linear radix sort
    order = np.argsort(rows, kind="stable")
    n_boundary = np.bincount(rows, minlength=present.size + 1)[1:]
    run_start = np.cumsum(n_boundary) - n_boundary
    picks = [run_start[i] + even_indices(int(n_boundary[i]), max_points) for i in range(present.size)]
    kept_vox = np.stack(np.unravel_index(boundary_flat[order[np.concatenate(picks)]], labels.shape), axis=1) + origin
    points = np.split(voxel_to_world(kept_vox, affine), np.cumsum([len(p) for p in picks])[:-1])

    # World-space covariance A C A^T for all labels at once, then one batched eigendecomposition.
    cov_world = lin @ cov_vox @ lin.T
    cov_world = (cov_world + np.swapaxes(cov_world, 1, 2)) / 2
    eigvals, eigvecs = np.linalg.eigh(cov_world)
    eigvecs = canonical_eigenvectors(eigvecs)
    centroids = voxel_to_world(mean_vox, affine)

    structures = []
    for i, label in enumerate(present.tolist()):
        slices = objects[label - 1]
        start = np.array([s.start for s in slices], dtype=np.int64)
        stop = np.array([s.stop for s in slices], dtype=np.int64) - 1
        corners = voxel_to_world(start + _CORNERS * (stop - start), affine)
        structures.append(Structure(
            label=label, name=str(label_names.get(label, f"label_{label}")), voxel_count=int(count[i]),
            volume_mm3=float(count[i] * voxel_volume), centroid_mm=centroids[i], covariance_mm2=cov_world[i],
            eigenvalues_mm2=eigvals[i], eigenvectors=eigvecs[i], bbox_voxel=Box(min=start, max=stop),
            bbox_mm=Box(min=corners.min(axis=0), max=corners.max(axis=0)), boundary_points_mm=points[i],
            n_boundary_voxels=int(n_boundary[i])))
    return structures


def grid_info(shape: tuple[int, ...], affine: np.ndarray, resolution: str) -> Grid:
    """Describe a voxel grid: shape (x, y, z), spacing in mm per array axis, 4x4 affine, axis codes."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    affine = np.asarray(affine, dtype=np.float64)
    return Grid(resolution=resolution, shape=tuple(int(s) for s in shape),
                spacing_mm=np.linalg.norm(affine[:3, :3], axis=0), affine=affine,
                orientation="".join(nib.aff2axcodes(affine)))


def build_passport(labels: np.ndarray, affine: np.ndarray, label_names: Mapping[int, str], *,
                   scan: dict, model: dict, resolution: str, max_points: int = 500) -> Passport:
    """The passport of an (x, y, z) label map on the grid of ``affine`` (voxel -> mm RAS+).

    ``resolution`` says which grid the labels are on: "model" (the network's resampled grid) or
    "original" (the scan's own grid). ``timing_s`` is the wall time of compute_structures in seconds.
    """
    t0 = time.perf_counter()
    structures = compute_structures(labels, affine, label_names, max_points=max_points)  # checks the label map
    elapsed = time.perf_counter() - t0
    grid = grid_info(np.shape(labels), affine, resolution)
    return Passport(world_frame=WORLD_FRAME, scan=scan, model=model, grid=grid, max_points=int(max_points),
                    structures=structures, timing_s=float(elapsed))


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, or of a folder's files' contents in sorted relative-path order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def scan_metadata(path: str | Path, image: nib.spatialimages.SpatialImage, sha256: str | None = None
                  ) -> dict[str, Any]:
    """Identify a scan: file, sha256, shape (x, y, z), spacing in mm, 4x4 affine, orientation codes.
    ``sha256``: the file's digest when the caller has already computed it (``file_sha256`` otherwise)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    return {
        "file": str(path),
        "sha256": sha256 or file_sha256(path),
        "shape": [int(s) for s in image.shape],
        "spacing_mm": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
        "affine": affine.tolist(),
        "orientation": "".join(nib.aff2axcodes(affine)),
    }


def save_passport(passport: Passport, path: str | Path) -> Path:
    """Write a passport as compact JSON, atomically; return the path."""
    return atomic_write_json(path, passport.to_json(), indent=None)


def load_passport(path: str | Path) -> Passport:
    """Read and check a passport JSON file (common.records.passport_model). Raises InputError (one line naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "passport file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not a JSON file ({exc})") from None
    return Passport.from_json(doc, path)


def structure_by_name(passport: Passport) -> dict[str, Structure]:
    """Map structure name -> Structure."""
    return {s.name: s for s in passport.structures}
