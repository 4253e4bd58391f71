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


@pytest.fixture(scope="session")
def standin_home(tmp_path_factory) -> Path:
    """A TOTALSEG_HOME_DIR holding the stand-in Task 297 weights, used by the whole test session.

    Hermetic: the user's ~/.totalsegmentator is never touched by tests.
    """
    home = Path(os.environ.get("TS_BENCH_TEST_HOME", tmp_path_factory.mktemp("totalseg_home")))
    os.environ["TOTALSEG_HOME_DIR"] = str(home)
    os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)
    from common.weights import build_standin, configure_offline_totalseg

    configure_offline_totalseg()
    build_standin()
    return home


@pytest.fixture(scope="session")
def model_spec(standin_home):
    from common.model import load_model_spec
    from common.weights import task297_folder

    return load_model_spec(task297_folder())


@pytest.fixture(scope="session")
def onnx_model(model_spec, tmp_path_factory) -> Path:
    """Exported once per session with its check report (task297.json) beside it."""
    from common.onnx_export import export_and_check

    path = tmp_path_factory.mktemp("models") / "task297.onnx"
    export_and_check(model_spec, path)
    return path


@pytest.fixture(scope="session")
def ort_predictor(onnx_model):
    from common.session import OnnxPredictor

    return OnnxPredictor(onnx_model)


@pytest.fixture(scope="session")
def torch_predictor(model_spec):
    from common.session import TorchPredictor

    return TorchPredictor(model_spec.build_network())
