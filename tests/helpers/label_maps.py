"""Hand-made label maps with known answers (Dice, voxel agreement), for the metrics and comparison tests."""
from __future__ import annotations

import numpy as np


def hand_maps() -> tuple[np.ndarray, np.ndarray]:
    """a: label 1 in x 0-1 (32 voxels), label 2 in x 2-3 / y 0-1 (16); b: label 1 in x 0 (16),
    label 2 in x 2-3 (32), label 3 at one voxel (1, 0, 0)."""
    a = np.zeros((4, 4, 4), np.uint8)
    a[0:2] = 1
    a[2:4, 0:2] = 2
    b = np.zeros((4, 4, 4), np.uint8)
    b[0] = 1
    b[2:4] = 2
    b[1, 0, 0] = 3
    return a, b

