"""Shared test fixtures: paths to the real CT data in ../shared (never copied into the project)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_CT = Path(os.environ.get("TS_BENCH_SHARED_CT", ROOT.parent / "shared" / "data" / "ct"))


def shared_ct(name: str) -> Path:
    path = SHARED_CT / name
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (tests need ../shared/data/ct next to the project)")
    return path


@pytest.fixture(scope="session")
def example_ct() -> Path:
    return shared_ct("example_ct.nii.gz")


@pytest.fixture(scope="session")
def example_ct_sm() -> Path:
    return shared_ct("example_ct_sm.nii.gz")


@pytest.fixture(scope="session")
def example_seg() -> Path:
    """Official 1.5 mm-model output for example_ct_sm (real anatomy labels)."""
    return shared_ct("example_seg.nii.gz")


@pytest.fixture(scope="session")
def example_seg_fast() -> Path:
    """Official fast (3 mm) model output for example_ct_sm."""
    return shared_ct("example_seg_fast.nii.gz")


@pytest.fixture(scope="session")
def example_mr_sm() -> Path:
    return shared_ct("example_mr_sm.nii.gz")
