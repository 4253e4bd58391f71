"""How far an approximate network moves the logits, and which voxels that can flip (issue 27, item 4).

On real CT tiles of a scan, the approximate predictor's logits are compared with the exact float32 ones, tile
by tile, one first-axis plane at a time (both predictors' ``tile_logits``: the network's last features, the
1x1x1 head applied per plane, so no (K, *patch) array is held):

* ``max_abs_logit_error``: the largest |approximate - exact| of any class at any voxel;
* ``max_pair_error``: the largest change of any difference of two logits at one voxel
  (max_k d_k - min_k d_k, d = approximate - exact); a voxel's label can flip only where its exact top-2
  margin (largest logit - second largest) is below that change, so this is the bound that matters;
* ``fraction_margin_below_max_error`` (the issue's figure) and ``fraction_margin_below_max_pair_error``
  (the rigorous bound): the share of the tiles' voxels whose exact top-2 margin is below each error;
* ``fraction_flipped``: the share whose per-tile argmax actually differs.

These are per-tile network outputs, before the Gaussian-weighted float16 sums; on random stand-in weights the
margins are tiny, so the fractions are pessimistic; on trained weights they are what a user needs to decide.
Axes are nnU-Net's (z, y, x) throughout.
"""
from __future__ import annotations

import numpy as np

from common.inference.sliding_window import pad_to_patch, tile_slices


def central_tiles(shape_zyx: tuple[int, ...], patch_size: tuple[int, ...], step: float, n: int) -> list[tuple]:
    """The ``n`` sliding-window tiles (slices in padded coordinates) whose centres lie nearest the volume's
    centre: where the body is, not the air at the corners."""
    tiles = tile_slices(tuple(max(s, p) for s, p in zip(shape_zyx, patch_size, strict=True)), patch_size, step)
    middle = np.array([max(s, p) / 2 for s, p in zip(shape_zyx, patch_size, strict=True)])
    dist = [float(np.linalg.norm([(t.start + t.stop) / 2 for t in tile] - middle)) for tile in tiles]
    return [tiles[i] for i in np.argsort(dist, kind="stable")[:max(1, n)]]


def _top2_margin(logits: np.ndarray) -> np.ndarray:
    """Largest minus second-largest logit along axis 0 of (K, ...) float32."""
    top = np.partition(logits, -2, axis=0)[-2:]
    return top[1] - top[0]


def margin_analysis(data: np.ndarray, exact, approximate, patch_size: tuple[int, ...], step: float = 0.8,
                    max_tiles: int = 1) -> dict:
    """Compare ``approximate`` with ``exact`` (predictors with ``tile_logits``) on up to ``max_tiles`` central
    tiles of ``data`` (the network input, float32 (1, z, y, x)). Returns the figures of the module docstring
    plus {"tiles", "voxels"}."""
    padded, _ = pad_to_patch(data, patch_size)
    margins: list[np.ndarray] = []
    max_abs = max_pair = 0.0
    flipped = voxels = 0
    tiles = central_tiles(data.shape[1:], patch_size, step, max_tiles)
    for tile in tiles:
        batch = padded[None, :, tile[0], tile[1], tile[2]]
        a, b = exact.tile_logits(batch), approximate.tile_logits(batch)
        for z in range(patch_size[0]):
            where = (slice(z, z + 1), slice(None), slice(None))
            ref = a.region(0, where).copy()  # the scratch buffer is reused by the next call
            diff = b.region(0, where) - ref
            max_abs = max(max_abs, float(np.abs(diff).max()))
            max_pair = max(max_pair, float((diff.max(0) - diff.min(0)).max()))
            flipped += int(((ref + diff).argmax(0) != ref.argmax(0)).sum())
            margins.append(_top2_margin(ref).ravel())
            voxels += ref[0].size
    margin = np.concatenate(margins)
    return {"tiles": len(tiles), "voxels": int(voxels), "max_abs_logit_error": max_abs, "max_pair_error": max_pair,
            "fraction_margin_below_max_error": float((margin < max_abs).mean()),
            "fraction_margin_below_max_pair_error": float((margin < max_pair).mean()),
            "fraction_flipped": flipped / voxels if voxels else None,
            "median_top2_margin": float(np.median(margin))}
