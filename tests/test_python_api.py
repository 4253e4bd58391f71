"""common.python_api.totalsegmentator, the drop-in for the official python API (issue 25): for a nibabel input it
returns what ``totalseg-fast --ml`` writes, voxel for voxel, and what the official function returns on the same
stand-in weights; it writes what the CLI writes; a second call reuses the model session; parameters this tool
does not run raise ValueError naming the parameter."""
from __future__ import annotations

import json
import threading

import nibabel as nib
import numpy as np
import pytest

from common.inference.run_config import RunConfig, save_config
from common.inference.weights import standin_folder
from common.python_api import session_builds, totalsegmentator
from common.runs.official import OfficialRunner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory, example_ct_sm, tiny_standin_home, project_home):
    d = tmp_path_factory.mktemp("python_api")
    scan = d / "ct.nii.gz"
    nib.save(nib.load(example_ct_sm).slicer[30:100, 25:85, 0:30], scan)
    cfg = d / "exact.json"
    save_config(RunConfig.fastest_exact(), cfg)
    with OfficialRunner(standin_folder(tiny_standin_home), project_home=tiny_standin_home) as runner:
        runner.segment(scan, d / "official.nii.gz", ml=True, timeout_s=600)
    with project_home(tiny_standin_home):
        from common.cli.console import main

        assert main(["-i", str(scan), "-o", str(d / "cli.nii.gz"), "--ml", "--weights", "standin", "-q",
                     "--config", str(cfg)]) == 0
        assert main(["-i", str(scan), "-o", str(d / "cli_masks"), "-s", "--weights", "standin", "-q",
                     "--config", str(cfg)]) == 0
        yield {"dir": d, "scan": scan, "cfg": cfg, "kw": {"weights": "standin", "config": cfg, "quiet": True}}


def _data(img) -> np.ndarray:
    return np.asanyarray(img.dataobj)


def _extension(img) -> list[bytes]:
    return [e.get_content() for e in img.header.extensions]


def test_a_nibabel_input_returns_what_the_cli_writes_and_the_session_is_built_once(work):
    img = nib.load(work["scan"])
    before = session_builds()
    first = totalsegmentator(img, None, ml=True, **work["kw"])
    built = session_builds()
    second = totalsegmentator(img, None, ml=True, **work["kw"])
    assert built - before <= 1 and session_builds() == built  # the second call built no session
    cli = nib.load(work["dir"] / "cli.nii.gz")
    for out in (first, second):
        assert isinstance(out, nib.Nifti1Image)
        assert np.array_equal(_data(out), _data(cli))
        assert np.allclose(out.affine, cli.affine) and _extension(out) == _extension(cli)
        assert out.get_data_dtype() == np.uint8


def test_the_returned_image_is_what_the_official_function_returns(work):
    ours = totalsegmentator(str(work["scan"]), None, ml=True, **work["kw"])
    theirs = nib.load(work["dir"] / "official.nii.gz")
    assert (_data(ours) == _data(theirs)).mean() >= 0.999
    assert _extension(ours) == _extension(theirs)


def test_it_writes_what_the_cli_writes_and_returns_the_statistics(work, tmp_path):
    out = tmp_path / "masks"
    img, stats = totalsegmentator(work["scan"], out, statistics=True, **work["kw"])
    cli = work["dir"] / "cli_masks"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in cli.iterdir())
    assert stats == json.loads((out / "statistics.json").read_text(encoding="utf-8"))
    assert stats == json.loads((cli / "statistics.json").read_text(encoding="utf-8"))
    from totalsegmentator.map_to_binary import class_map

    liver = {v: k for k, v in class_map["total"].items()}["liver"]
    assert np.array_equal(_data(nib.load(out / "liver.nii.gz")), (_data(img) == liver).astype(np.uint8))


def test_calls_from_two_threads_give_the_same_image(work):
    img = nib.load(work["scan"])
    results: list = [None, None]

    def call(k: int) -> None:
        results[k] = totalsegmentator(img, None, ml=True, **work["kw"])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(r is not None for r in results)
    assert np.array_equal(_data(results[0]), _data(results[1]))


@pytest.mark.parametrize("kwargs", [{"task": "lung_vessels"}, {"fast": False}, {"fastest": True}, {"body_seg": True},
                                    {"roi_subset_robust": ["liver"]}, {"robust_crop": True}, {"radiomics": True},
                                    {"higher_order_resampling": True}, {"device": "mps"}, {"test": 1},
                                    {"output_type": "dicom_seg"}, {"v1_order": True},
                                    {"save_lowres": True, "roi_subset": ["liver"]}])
def test_parameters_this_tool_does_not_run_raise_value_error_naming_them(work, kwargs):
    before = session_builds()
    with pytest.raises(ValueError) as exc:
        totalsegmentator(nib.load(work["scan"]), None, **kwargs, **work["kw"])
    message = str(exc.value)
    assert "\n" not in message
    assert any(name in message for name in kwargs), message
    assert session_builds() == before  # refused before any work
