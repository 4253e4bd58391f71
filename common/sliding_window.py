"""nnU-Net-style sliding-window inference over a (C, Z, Y, X) volume with a Gaussian importance map.

Backend-agnostic: the caller passes ``predict(batch)`` mapping float32 (B, C, *patch) -> (B, K, *patch)
logits. Axes here are nnU-Net's (transposed) axes; the patch size comes from the plans.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter

Predict = Callable[[np.ndarray], np.ndarray]


def compute_steps(image_size: tuple[int, ...], patch_size: tuple[int, ...], step: float) -> list[list[int]]:
    """Tile start indices per axis, as nnU-Net's compute_steps_for_sliding_window (image >= patch)."""
    if not 0 < step <= 1:
        raise ValueError("tile step must be in (0, 1]")
    steps = []
    for size, patch in zip(image_size, patch_size, strict=True):
        if size < patch:
            raise ValueError(f"image size {image_size} smaller than patch {patch_size}: pad first")
        n = int(np.ceil((size - patch) / (patch * step))) + 1
        actual = (size - patch) / (n - 1) if n > 1 else 0.0
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


def tile_slices(image_size: tuple[int, ...], patch_size: tuple[int, ...], step: float) -> list[tuple[slice, ...]]:
    """Spatial slices of every tile, in nnU-Net's order (first axis outermost)."""
    steps = compute_steps(image_size, patch_size, step)
    grids = np.meshgrid(*steps, indexing="ij")
    starts = np.stack([g.ravel() for g in grids], axis=1)
    return [tuple(slice(int(s), int(s) + p) for s, p in zip(start, patch_size, strict=True)) for start in starts]


@lru_cache(maxsize=4)
def gaussian_importance(patch_size: tuple[int, ...], sigma_scale: float = 1.0 / 8,
                        value_scaling_factor: float = 10.0) -> np.ndarray:
    """nnU-Net's compute_gaussian, float16 (as nnU-Net builds it), zeros replaced by the smallest value."""
    tmp = np.zeros(patch_size)
    tmp[tuple(p // 2 for p in patch_size)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    g /= np.max(g) / value_scaling_factor
    g = g.astype(np.float16)
    g[g == 0] = np.min(g[g != 0])
    g.flags.writeable = False
    return g


def pad_to_patch(data: np.ndarray, patch_size: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad the spatial axes of (C, *spatial) up to the patch size with 0, content centred (nnU-Net's
    pad_nd_image: the extra voxel of an odd difference goes after). Returns (padded, slicer to undo)."""
    spatial = data.shape[1:]
    diff = [max(p - s, 0) for s, p in zip(spatial, patch_size, strict=True)]
    pads = [(d // 2, d - d // 2) for d in diff]
    if not any(diff):
        return data, tuple(slice(0, s) for s in spatial)
    padded = np.pad(data, [(0, 0), *pads], mode="constant", constant_values=0)
    return padded, tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial, strict=True))


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _overlap(tile: tuple[slice, ...], keep: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Where a tile (padded coordinates) meets the kept region: (slices into the tile, slices into the
    kept region), or None if they do not meet."""
    in_tile, in_keep = [], []
    for t, k in zip(tile, keep, strict=True):
        lo, hi = max(t.start, k.start), min(t.stop, k.stop)
        if lo >= hi:
            return None
        in_tile.append(slice(lo - t.start, hi - t.start))
        in_keep.append(slice(lo - k.start, hi - k.start))
    return tuple(in_tile), tuple(in_keep)


def sliding_window_logits(data: np.ndarray, predict: Predict, num_classes: int, patch_size: tuple[int, ...],
                          step: float = 0.5, batch_size: int = 1, accumulate: str = "float16",
                          normalize: bool = True, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Gaussian-weighted sliding-window logits for a (C, *spatial) float32 volume; returns (K, *spatial)
    float32 (in float16 mode: the float16 results, converted exactly).

    accumulate="float16" reproduces nnU-Net 2.x: tile logits (float32) times the float16 Gaussian are added
    into float16 sums in the same tile order, then divided by the float16 weight sum. It uses torch tensors
    for those sums, as nnU-Net does (numpy's float16 casts are ~20x slower on the subnormal values that the
    Gaussian's tails produce). accumulate="float32" sums in numpy float32 (closer to exact arithmetic).
    With ``normalize=False`` the division by the weight sum is skipped: every voxel's weights are positive,
    so the argmax is unchanged by it and callers that only need labels save a full pass.

    Sums are kept only for the unpadded volume: nnU-Net accumulates over the padded one and then cuts the
    padding away; each voxel sees the same additions in the same order either way, so the result is
    identical while a scan much thinner than a patch (30 of 112 slices) costs a fraction of the work.
    """
    if accumulate not in ("float16", "float32"):
        raise ValueError("accumulate must be 'float16' or 'float32'")
    padded, keep = pad_to_patch(data, patch_size)
    slices = tile_slices(padded.shape[1:], patch_size, step)
    spatial = data.shape[1:]
    gauss16 = gaussian_importance(tuple(patch_size))
    if accumulate == "float16":
        import torch

        gauss = torch.from_numpy(gauss16.copy())
        logits = torch.zeros((num_classes, *spatial), dtype=torch.half)
        weights = torch.zeros(spatial, dtype=torch.half)
    else:
        gauss = gauss16.astype(np.float32)
        logits = np.zeros((num_classes, *spatial), dtype=np.float32)
        weights = np.zeros(spatial, dtype=np.float32)
    first = True
    for group in _batches(slices, batch_size):
        batch = np.stack([padded[(slice(None), *sl)] for sl in group]).astype(np.float32, copy=False)
        out = predict(batch)
        for k, sl in enumerate(group):
            ov = _overlap(sl, keep)
            if ov is None:
                continue
            in_tile, in_keep = ov
            tile = np.ascontiguousarray(out[(k, slice(None), *in_tile)])
            g = gauss[in_tile]
            if accumulate == "float16":
                tile = torch.from_numpy(tile)
            tile *= g                # float32 *= float16 Gaussian -> float32, as nnU-Net
            region = (slice(None), *in_keep)
            if first:  # nothing summed yet: 0 + x rounds exactly like x, so a (faster) converting copy
                logits[region] = tile
                weights[in_keep] = g
                first = False
            else:
                logits[region] += tile  # float16 += float32 rounds once, as nnU-Net
                weights[in_keep] += g
        if progress is not None:
            progress(len(group))
    if normalize:
        if accumulate == "float16":
            torch.div(logits, weights, out=logits)
        else:
            logits /= weights
    if accumulate == "float16":
        # float16 -> float32 is exact; comparisons (argmax) are several times faster on float32 in numpy
        return logits.float().numpy()
    return logits


def argmax_first(logits: np.ndarray) -> np.ndarray:
    """argmax over axis 0 (first maximum wins, as numpy/torch); one contiguous pass per class, which is
    several times faster than np.argmax(axis=0) on (K, Z, Y, X) arrays. Returns uint8 (uint16 if K > 256)."""
    k_count = logits.shape[0]
    best = logits[0].astype(np.float32)
    idx = np.zeros(logits.shape[1:], dtype=np.uint8 if k_count <= 256 else np.uint16)
    for k in range(1, k_count):
        lk = logits[k]
        idx[lk > best] = k
        np.maximum(best, lk, out=best)
    return idx


def sliding_window_labels(data: np.ndarray, predict: Predict, num_classes: int, patch_size: tuple[int, ...],
                          step: float = 0.5, batch_size: int = 1, accumulate: str = "float16",
                          progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Labels (spatial) from the sliding-window logits: argmax, first maximum wins."""
    normalize = accumulate == "float16"  # float16 rounding after the division decides ties: keep it exact
    logits = sliding_window_logits(data, predict, num_classes, patch_size, step, batch_size, accumulate,
                                   normalize=normalize, progress=progress)
    return argmax_first(logits)
