"""Dice, voxel agreement and statistics on hand-made label maps with known answers."""
from __future__ import annotations

import numpy as np
import pytest
from helpers.label_maps import hand_maps

from common.records import metrics
from common.records.metrics import (
    class_voxel_counts,
    dice_buckets,
    dice_per_class,
    latency_stats,
    organ_difference,
    quantiles,
    voxel_agreement,
)


def test_dice_by_hand():
    a, b = hand_maps()
    d = dice_per_class(a, b)
    assert list(d) == [1, 2, 3]
    assert d[1] == pytest.approx(2 * 16 / (32 + 16))  # 2/3
    assert d[2] == pytest.approx(2 * 16 / (16 + 32))  # 2/3
    assert d[3] == 0.0  # only in b


def test_agreement_by_hand():
    a, b = hand_maps()
    # equal: x=0 (16 voxels of 1) and x 2-3 / y 0-1 (16 voxels of 2) -> 32 of 64
    assert voxel_agreement(a, b) == pytest.approx(0.5)
    assert voxel_agreement(a, a) == 1.0


def test_dice_empty_and_requested_labels():
    a, b = hand_maps()
    d = dice_per_class(a, b, labels=[1, 7])
    assert set(d) == {1, 7}
    assert d[7] == 1.0  # empty in both: defined as 1.0
    zeros = np.zeros((3, 3, 3), np.int16)
    assert dice_per_class(zeros, zeros) == {}  # nothing present, nothing reported


def test_dice_disjoint_and_identical():
    a = np.zeros((4, 4, 4), np.int32)
    b = np.zeros_like(a)
    a[:2] = 5
    b[2:] = 5
    assert dice_per_class(a, b) == {5: 0.0}
    assert voxel_agreement(a, b) == 0.0
    assert dice_per_class(a, a) == {5: 1.0}


def test_shape_mismatch_and_bad_labels():
    with pytest.raises(ValueError):
        voxel_agreement(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError):
        dice_per_class(np.zeros((2, 2, 2), int), np.zeros((2, 3, 2), int))
    with pytest.raises(ValueError):
        dice_per_class(np.full((2, 2, 2), -1), np.zeros((2, 2, 2), int))
    with pytest.raises(ValueError):
        dice_per_class(np.full((2, 2, 2), 0.5), np.zeros((2, 2, 2)))


def _naive_dice(a, b):
    out = {}
    for lab in sorted(set(np.unique(a)) | set(np.unique(b))):
        if lab == 0:
            continue
        ma, mb = a == lab, b == lab
        out[int(lab)] = 2 * np.logical_and(ma, mb).sum() / (ma.sum() + mb.sum())
    return out


def test_dice_matches_naive_chunked_and_sparse(monkeypatch):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, (9, 8, 7)).astype(np.uint8)
    b = np.where(rng.random(a.shape) < 0.8, a, rng.integers(0, 6, a.shape)).astype(np.uint8)
    expected = _naive_dice(a, b)
    monkeypatch.setattr(metrics, "_CHUNK", 37)  # many chunks, odd size
    got = dice_per_class(a, b)
    assert got == pytest.approx(expected)
    assert voxel_agreement(a, b) == pytest.approx(np.mean(a == b))
    big_a, big_b = a.astype(np.int32) * 5000, b.astype(np.int32) * 5000  # sparse label ids
    got_big = dice_per_class(big_a, big_b)
    assert got_big == pytest.approx({k * 5000: v for k, v in expected.items()})
    assert class_voxel_counts(big_a) == {k * 5000: int((a == k).sum()) for k in range(1, 6) if (a == k).any()}


def test_class_voxel_counts():
    a, b = hand_maps()
    assert class_voxel_counts(a) == {1: 32, 2: 16}
    assert class_voxel_counts(b, include_background=True) == {0: 15, 1: 16, 2: 32, 3: 1}


def test_dice_buckets_boundaries():
    got = dice_buckets([0.99, 0.951, 0.95, 0.90, 0.899, 0.85, 0.849, 0.0, float("nan")])
    assert got == {">0.95": 2, "0.90-0.95": 2, "0.85-0.90": 2, "<0.85": 2}


def test_quantiles_and_latency():
    q = quantiles(range(11))
    assert q == {"p10": 1.0, "p25": 2.5, "p50": 5.0, "p75": 7.5, "p90": 9.0}
    assert quantiles([]) == {"p10": None, "p25": None, "p50": None, "p75": None, "p90": None}
    s = latency_stats([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["p95"] == pytest.approx(3.85)
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert latency_stats([])["mean"] is None
    assert latency_stats([2.0])["std"] == 0.0


def test_organ_difference():
    names = {1: "spleen", 2: "liver", "3": "stomach"}
    d = organ_difference({0, 1, 2, 4}, {1, 3}, names)
    assert d == {"n_a": 3, "n_b": 2, "difference": -1, "missing": ["liver", "label_4"], "extra": ["stomach"]}
