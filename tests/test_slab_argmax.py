"""Slab-wise argmax (sliding_window_labels) equals the whole-volume computation exactly, and its memory no
longer grows with volume x classes.

The reference is the whole-volume path: argmax_first(sliding_window_logits(...)), which keeps the full
(K, Z, Y, X) sums as nnU-Net does. A deterministic stand-in "network" whose logits are quantised makes exact
ties and near-ties common, so any change in the addition order or the first-maximum rule shows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common.inference.sliding_window import argmax_first, sliding_window_labels, sliding_window_logits

ROOT = Path(__file__).resolve().parents[1]


def quantised_net(num_classes: int, seed: int = 0):
    """predict(batch (B, 1, *patch)) -> (B, K, *patch) float32: smooth functions of the input and of the
    position inside the tile (so overlapping tiles disagree), rounded to 1/8 (many exact ties)."""
    rng = np.random.default_rng(seed)
    a, b, c = rng.normal(size=(3, num_classes)).astype(np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        pos = np.indices(batch.shape[2:], dtype=np.float32).sum(axis=0)
        x = batch[:, :1] * a[None, :, None, None, None] + np.sin(pos * 0.3)[None, None] * b[None, :, None, None, None]
        return (np.round((x + c[None, :, None, None, None]) * 8) / 8).astype(np.float32)

    return predict


@pytest.mark.parametrize("accumulate", ["float16", "float32"])
@pytest.mark.parametrize("shape,patch,step,batch", [
    ((61, 23, 30), (16, 12, 12), 0.5, 1),   # many rows along the first axis, 4 x 3 columns
    ((40, 37, 20), (16, 16, 16), 0.8, 2),   # tiles per call = 2, rows end inside a batch
    ((10, 30, 25), (16, 16, 16), 0.8, 1),   # thinner than a patch along the first axis: padded
    ((33, 9, 41), (8, 16, 8), 1.0, 3),      # padded on the second axis, step 1
])
def test_slab_labels_equal_whole_volume_labels(shape, patch, step, batch, accumulate):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(1, *shape)).astype(np.float32)
    predict = quantised_net(118)
    kw = dict(num_classes=118, patch_size=patch, step=step, batch_size=batch, accumulate=accumulate)
    whole = argmax_first(sliding_window_logits(data, predict, normalize=accumulate == "float16", **kw))
    slab = sliding_window_labels(data, predict, **kw)
    assert slab.dtype == whole.dtype and slab.shape == whole.shape == shape
    assert np.array_equal(slab, whole)
    assert len(np.unique(slab)) > 10


_PEAK = textwrap.dedent("""
    import json, sys
    import numpy as np
    from common.inference.sliding_window import argmax_first, sliding_window_labels, sliding_window_logits

    def predict(batch):
        return np.broadcast_to(batch[:, :1], (batch.shape[0], 118, *batch.shape[2:])) * np.float32(0.5)

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    data = np.random.default_rng(0).normal(size=(1, {z}, 64, 64)).astype(np.float32)
    kw = dict(num_classes=118, patch_size=(16, 64, 64), step=0.5)
    import torch  # imported before the baseline, like the pipeline does
    base = vm("VmRSS")
    if {whole}:
        labels = argmax_first(sliding_window_logits(data, predict, **kw))
    else:
        labels = sliding_window_labels(data, predict, **kw)
    print(json.dumps({{"growth": vm("VmHWM") - base, "labels": int(labels.max())}}))
""")


def _peak_growth(z: int, whole: bool) -> int:
    code = _PEAK.format(z=z, whole=whole)
    # a fixed mmap threshold: glibc's adaptive one keeps freed blocks in the heap, so its peak would grow
    # with the number of alloc/free cycles (rows) whatever the algorithm holds; this measures what it holds
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth"]


def test_peak_memory_does_not_scale_with_volume_times_classes():
    """Eight times the slices: the whole-volume sums grow by ~(K x dZ x 64 x 64) x (2 + 4) bytes (float16 sums
    and their float32 copy for the argmax), about 1 GB here; the slab-wise window stays the same size."""
    mb = 1 << 20
    small, large = _peak_growth(64, whole=False), _peak_growth(512, whole=False)
    old_small, old_large = _peak_growth(64, whole=True), _peak_growth(512, whole=True)
    print(f"peak growth: slab-wise {small / mb:.0f} -> {large / mb:.0f} MB, "
          f"whole-volume {old_small / mb:.0f} -> {old_large / mb:.0f} MB")
    assert old_large - old_small > 800 * mb      # the old path scales with volume x classes ...
    assert large - small < 60 * mb               # ... the slab-wise one does not (labels: 1.8 MB)
