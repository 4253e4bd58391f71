"""Shared cases of the tests of 07_compare_vanilla_vs_optimized.py: the stand-in model record of hand-made
results, and the script imported as a module."""
from __future__ import annotations

from helpers.script_loader import load_script

LABELS = {"1": "spleen", "2": "liver", "3": "stomach"}
STANDIN = {"name": "Task297_fast_standin", "weights": "standin", "sha256": "ab" * 32, "labels": LABELS}


def load_07():
    return load_script("07_compare_vanilla_vs_optimized.py")

