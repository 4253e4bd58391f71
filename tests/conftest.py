"""Shared test fixtures: paths to the real CT data in ../shared (never copied into the project)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHARED_CT = Path(os.environ.get("TS_BENCH_SHARED_CT", ROOT.parent / "shared" / "data" / "ct"))

# The user's environment during tests: HOME and TOTALSEG_HOME_DIR are empty temporary folders, set before
# anything imports TotalSegmentator. At the end of the session `user_home_untouched` checks that nothing of
# the suite (scripts 02-07 run in-process and as subprocesses by the tests) wrote into them.
USER_HOME = Path(tempfile.mkdtemp(prefix="ts-bench-user-home-"))
os.environ["HOME"] = str(USER_HOME)
os.environ["TOTALSEG_HOME_DIR"] = str(USER_HOME / ".totalsegmentator")
os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)


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


@pytest.fixture()
def user_home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty user environment for one test: HOME and TOTALSEG_HOME_DIR in tmp_path (also for this
    process); returns the TotalSegmentator home (not created)."""
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home / ".totalsegmentator"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    return home / ".totalsegmentator"


def written_into_user_home() -> list[str]:
    """What sits in the test session's TotalSegmentator user home that the suite must never write there:
    a Task 297 folder or a config.json."""
    home = Path(os.environ["TOTALSEG_HOME_DIR"])
    found = [str(p) for p in home.rglob("Dataset297*")] if home.exists() else []
    return found + ([str(home / "config.json")] if (home / "config.json").exists() else [])


@pytest.fixture(scope="session", autouse=True)
def user_home_untouched():
    """Session-wide check: after every test has run, the user's TotalSegmentator home holds nothing of ours."""
    yield
    assert not written_into_user_home(), f"the suite wrote into the user's TotalSegmentator home: {written_into_user_home()}"


@pytest.fixture(scope="session")
def standin_home() -> Path:
    """The project's own TotalSegmentator home (models/totalseg_home) holding the stand-in Task 297 weights,
    used by the whole test session (built once; quickstart.sh builds the same folder)."""
    from common.inference.weights import build_standin, prepare_project_home

    home = prepare_project_home()
    build_standin()
    return home


@pytest.fixture(scope="session")
def model_spec(standin_home):
    from common.inference.model import load_model_spec
    from common.inference.weights import standin_folder

    return load_model_spec(standin_folder())


@pytest.fixture(scope="session")
def onnx_model(model_spec, tmp_path_factory) -> Path:
    """Exported once per session with its check report (task297.json) beside it."""
    from common.inference.onnx_export import export_and_check

    path = tmp_path_factory.mktemp("models") / "task297.onnx"
    export_and_check(model_spec, path)
    return path


@pytest.fixture(scope="session")
def ort_predictor(onnx_model):
    from common.inference.predictors import OnnxPredictor

    return OnnxPredictor(onnx_model)


@pytest.fixture(scope="session")
def torch_predictor(model_spec):
    from common.inference.predictors import TorchPredictor

    return TorchPredictor(model_spec.build_network())


@pytest.fixture(scope="session")
def tiny_standin_home(tmp_path_factory) -> Path:
    """A project TotalSegmentator home whose stand-in uses 32^3-voxel tiles instead of 112 x 112 x 128: the
    same network, code paths and arithmetic, ~50x less compute per tile. For tests that need many runs of
    the network (official or ours) on tiny crops; use with TS_BENCH_TOTALSEG_HOME and --weights standin."""
    from common.inference.weights import build_standin, prepare_project_home, standin_folder

    home = prepare_project_home(tmp_path_factory.mktemp("tiny_home"))
    build_standin(standin_folder(home), patch_size=(32, 32, 32))
    return home


@pytest.fixture(scope="session")
def tiny_onnx_model(tiny_standin_home, tmp_path_factory) -> Path:
    """The small-tile stand-in exported to ONNX (its checkpoint, which embeds the plans, has its own sha256)."""
    from common.inference.model import load_model_spec
    from common.inference.onnx_export import export_and_check
    from common.inference.weights import standin_folder

    path = tmp_path_factory.mktemp("tiny_models") / "task297.onnx"
    export_and_check(load_model_spec(standin_folder(tiny_standin_home)), path)
    return path


@contextlib.contextmanager
def _project_home(home: Path):
    """While the block runs, the suite's own TotalSegmentator home ($TS_BENCH_TOTALSEG_HOME) is ``home``."""
    from common.inference.weights import PROJECT_HOME_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PROJECT_HOME_ENV, str(home))
        yield home


@pytest.fixture(scope="session")
def project_home():
    """project_home(home): a context manager for module-scoped fixtures (see _project_home)."""
    return _project_home


@pytest.fixture
def in_tiny_home(tiny_standin_home) -> Path:
    """For one test: the scripts' stand-in is the small-tile one (pass --weights standin to them)."""
    with _project_home(tiny_standin_home):
        yield tiny_standin_home


@pytest.fixture(scope="session")
def official_runner(standin_home, model_spec):
    """One isolated official TotalSegmentator worker for the session (its start-up, ~5-9 s, paid once)."""
    from common.runs.official import OfficialRunner

    with OfficialRunner(model_spec.folder) as runner:
        yield runner


@pytest.fixture(scope="session")
def official_labels(official_runner, tmp_path_factory):
    """official_labels(path) -> the official tool's label array for that scan, computed once per session
    (keyed on the file's content), so tests that only need the reference share one official run."""
    from common.records.resume import input_digest
    from common.runs.official import run_official

    cache: dict[str, object] = {}
    folder = tmp_path_factory.mktemp("official_cache")

    def get(path: Path):
        key = input_digest(path)
        if key not in cache:
            img, _ = run_official(path, folder / f"{key[:16]}.nii.gz", runner=official_runner)
            cache[key] = img
        return cache[key]

    return get
