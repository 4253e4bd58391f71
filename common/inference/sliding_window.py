"""nnU-Net-style sliding-window inference over a (C, Z, Y, X) volume with a Gaussian importance map.

Backend-agnostic: the caller passes ``predict(batch)`` mapping float32 (B, C, *patch) -> (B, K, *patch)
logits. A predictor that also has ``tile_logits(batch) -> TileLogits`` (common.inference.torch_channels_last) has its
head applied region by region instead, so that the whole (B, K, *patch) array is never written. Axes here
are nnU-Net's (transposed) axes; the patch size comes from the plans.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

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


def _check_accumulate(accumulate: str) -> None:
    if accumulate not in ("float16", "float32"):
        raise ValueError("accumulate must be 'float16' or 'float32'")


class TileLogits(Protocol):
    """The logits of one batch of tiles, read region by region (what ``predict.tile_logits(batch)`` returns)."""

    def region(self, k: int, where: tuple[slice, ...]) -> np.ndarray:
        """float32 (K, *region) logits of tile k over the spatial slices ``where`` (tile coordinates), writable:
        the caller scales it in place. It may be a scratch buffer that the next call overwrites."""


class ArrayLogits:
    """TileLogits over the (B, K, *patch) array of a plain ``predict(batch)``: regions are views of it."""

    def __init__(self, out: np.ndarray):
        self.out = out

    def region(self, k: int, where: tuple[slice, ...]) -> np.ndarray:
        view = self.out[(k, slice(None), *where)]
        return view if view.flags.writeable else view.copy()


def _tile_logits(predict: Predict, batch: np.ndarray) -> TileLogits:
    """A predictor with ``tile_logits`` (common.inference.torch_channels_last) hands its head over to be applied region
    by region; any other predictor's whole output array is wrapped."""
    lazy = getattr(predict, "tile_logits", None)
    return lazy(batch) if lazy is not None else ArrayLogits(predict(batch))


@dataclass
class _Tile:
    """One tile's contribution: its logits, where it overlaps the kept (unpadded) volume (``in_tile``: slices
    into the tile, ``in_keep``: into the volume) and the Gaussian there (float16 torch tensor in float16 mode,
    float32 numpy otherwise)."""

    logits: TileLogits
    k: int
    in_tile: tuple[slice, ...]
    in_keep: tuple[slice, ...]
    g: Any
    torch_mode: bool

    @property
    def depth(self) -> int:
        return self.in_tile[0].stop - self.in_tile[0].start

    def weighted(self, a: int = 0, b: int | None = None):
        """Logits x Gaussian over planes [a, b) of the overlap along the first axis: float32 (K, b - a, ...),
        a torch tensor in float16 mode (float32 *= float16 Gaussian -> float32, as nnU-Net), numpy otherwise.
        Scaling plane by plane rounds each product exactly as scaling the whole tile does."""
        b = self.depth if b is None else b
        first = slice(self.in_tile[0].start + a, self.in_tile[0].start + b)
        tile = self.logits.region(self.k, (first, *self.in_tile[1:]))
        if self.torch_mode:
            import torch

            tile = torch.from_numpy(tile)
        tile *= self.g[a:b]
        return tile


def _tiles(data: np.ndarray, predict: Predict, patch_size: tuple[int, ...], step: float, batch_size: int,
           accumulate: str, progress: Callable[[int], None] | None) -> Iterator[_Tile]:
    """Yield the tiles that overlap the (C, *spatial) volume, in nnU-Net's order (first axis outermost);
    their weighted logits are computed when read (``_Tile.weighted``), before the next tile is yielded."""
    padded, keep = pad_to_patch(data, patch_size)
    gauss16 = gaussian_importance(tuple(patch_size))
    if accumulate == "float16":
        import torch

        gauss = torch.from_numpy(gauss16.copy())
    else:
        gauss = gauss16.astype(np.float32)
    for group in _batches(tile_slices(padded.shape[1:], patch_size, step), batch_size):
        batch = np.stack([padded[(slice(None), *sl)] for sl in group]).astype(np.float32, copy=False)
        logits = _tile_logits(predict, batch)
        for k, sl in enumerate(group):
            ov = _overlap(sl, keep)
            if ov is not None:
                yield _Tile(logits, k, ov[0], ov[1], gauss[ov[0]], accumulate == "float16")
        del logits
        if progress is not None:
            progress(len(group))


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
    _check_accumulate(accumulate)
    spatial = data.shape[1:]
    if accumulate == "float16":
        import torch

        logits = torch.zeros((num_classes, *spatial), dtype=torch.half)
        weights = torch.zeros(spatial, dtype=torch.half)
    else:
        logits = np.zeros((num_classes, *spatial), dtype=np.float32)
        weights = np.zeros(spatial, dtype=np.float32)
    first = True
    for t in _tiles(data, predict, patch_size, step, batch_size, accumulate, progress):
        region = (slice(None), *t.in_keep)
        tile = t.weighted()
        if first:  # nothing summed yet: 0 + x rounds exactly like x, so a (faster) converting copy
            logits[region] = tile
            weights[t.in_keep] = t.g
            first = False
        else:
            logits[region] += tile  # float16 += float32 rounds once, as nnU-Net
            weights[t.in_keep] += t.g
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


class _SlabSums:
    """Gaussian-weighted logit sums for a window of slabs along the first spatial axis.

    Holds (K, W, *rest) sums and (W, *rest) weights for first-axis indices [lo, lo + W), W = the patch's
    first-axis size. Tiles arrive in nnU-Net's order (first axis outermost), so when a tile starting at
    first-axis index z arrives, every index below z is final: ``finalize_below(z)`` turns those slabs into
    labels and moves the window up. Each voxel sees exactly the additions it would see in a whole-volume
    buffer, in the same order (a fresh slab is zeros, and 0 + x rounds like x), so labels are identical
    while memory is bounded by one patch row instead of volume x classes.
    """

    def __init__(self, num_classes: int, spatial: tuple[int, ...], depth: int, accumulate: str, normalize: bool):
        self.accumulate, self.normalize = accumulate, normalize
        self.depth = min(depth, spatial[0])
        self.lo = 0
        self.labels = np.zeros(spatial, dtype=np.uint8 if num_classes <= 256 else np.uint16)
        self._buf = None  # float32 scratch for the float16 accumulation, grown on demand
        shape = (num_classes, self.depth, *spatial[1:])
        if accumulate == "float16":
            import torch

            self.sums = torch.zeros(shape, dtype=torch.half)
            self.weights = torch.zeros(shape[1:], dtype=torch.half)
        else:
            self.sums = np.zeros(shape, dtype=np.float32)
            self.weights = np.zeros(shape[1:], dtype=np.float32)

    def add(self, tile: _Tile, first: bool) -> None:
        """Add one tile's weighted logits, a few first-axis planes at a time (``PLANES``): each plane's logits
        (computed on request for predictors with ``tile_logits``), its Gaussian scaling and its float16 add
        stay in cache, instead of passes over the whole (K, *tile) array (757 MB per 112x112x128 tile)."""
        z0 = tile.in_keep[0].start - self.lo
        weights = (slice(z0, z0 + tile.depth), *tile.in_keep[1:])
        if first:  # nothing summed yet: 0 + x rounds exactly like x, so a (faster) converting copy
            self.weights[weights] = tile.g
        else:
            self.weights[weights] += tile.g
        for a in range(0, tile.depth, self.PLANES):
            b = min(a + self.PLANES, tile.depth)
            part = tile.weighted(a, b)
            region = (slice(None), slice(z0 + a, z0 + b), *tile.in_keep[1:])
            if first:
                self.sums[region] = part
            elif self.accumulate == "float32":
                self.sums[region] += part
            else:
                # float16 += float32 as nnU-Net does it (torch: float32(sum) + tile, rounded once to float16),
                # written as its three steps through a small float32 buffer: bit-identical, and ~3x faster
                # than torch's mixed-dtype in-place add on 2 cores
                sums = self.sums[region]
                buf = self._buffer(sums.shape)
                buf.copy_(sums)
                buf.add_(part)
                sums.copy_(buf)

    PLANES = 1  # first-axis planes per step of add(): 118 x 112 x 128 float32 = 6.8 MB per plane
    FINAL_PLANES = 16  # first-axis planes per argmax step

    def _buffer(self, shape):
        import torch

        n = int(np.prod(shape))
        if self._buf is None or self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.float32)
        return self._buf[:n].view(shape)

    def finalize_below(self, z: int) -> None:
        """Labels for first-axis indices [lo, z), then slide the window so that it starts at z."""
        n = min(z, self.lo + self.depth) - self.lo
        if n <= 0:
            return
        for a in range(0, n, self.FINAL_PLANES):  # a few planes at a time: small float32 temporaries
            b = min(a + self.FINAL_PLANES, n)
            sums, weights = self.sums[:, a:b], self.weights[a:b]
            if self.normalize:
                sums = sums / weights  # elementwise: the same rounding as dividing the whole volume
            if self.accumulate == "float16":
                sums = sums.float().numpy()  # float16 -> float32 is exact; numpy compares float32 fast
            self.labels[self.lo + a:self.lo + b] = argmax_first(sums)
        keep = self.depth - n
        for j in range(keep):  # move the open slabs down, one plane at a time (no overlapping copy)
            self.sums[:, j] = self.sums[:, j + n]
            self.weights[j] = self.weights[j + n]
        self.sums[:, keep:] = 0
        self.weights[keep:] = 0
        self.lo += n


def sliding_window_labels(data: np.ndarray, predict: Predict, num_classes: int, patch_size: tuple[int, ...],
                          step: float = 0.5, batch_size: int = 1, accumulate: str = "float16",
                          progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Labels (spatial, nnU-Net axes) of a (C, *spatial) float32 volume: Gaussian-weighted sliding-window
    logits as ``sliding_window_logits`` computes them, then argmax (first maximum wins).

    The sums are kept only for one row of tiles along the first axis at a time (see _SlabSums): the
    labels equal the whole-volume computation exactly, and the memory is (K x patch[0] x rest) instead of
    (K x volume), float16 plus the float32 copy of one finished slab for the argmax.
    """
    _check_accumulate(accumulate)
    normalize = accumulate == "float16"  # float16 rounding after the division decides ties: keep it exact
    acc = _SlabSums(num_classes, data.shape[1:], patch_size[0], accumulate, normalize)
    first = True
    for tile in _tiles(data, predict, patch_size, step, batch_size, accumulate, progress):
        acc.finalize_below(tile.in_keep[0].start)
        acc.add(tile, first)
        first = False
    acc.finalize_below(data.shape[1])
    return acc.labels
