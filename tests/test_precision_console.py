"""--precision bf16 in totalseg-fast and precision="bf16" in the python API (issue 27): opt-in, and labelled
approximate where a user sees it: a console line on stderr (even with -q), the passport's provenance, and the
API's warning. Runs on the small-tile stand-in; skipped (with the reason) on a CPU without native bf16."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from common.inference import precision
from common.inference.run_config import RunConfig, save_config

pytestmark = pytest.mark.skipif(precision.native_bf16() is None,
                                reason="this CPU has no native bf16 (AVX512_BF16 / AMX-BF16)")


@pytest.fixture
def scan(tmp_path, example_ct_sm, in_tiny_home):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.load(example_ct_sm).slicer[30:100, 25:85, 0:30], path)
    cfg = tmp_path / "exact.json"
    save_config(RunConfig.fastest_exact(), cfg)
    return path, cfg


def test_totalseg_fast_bf16_says_approximate_on_stderr_and_in_the_passport(scan, tmp_path, capsys):
    from common.cli.console import main

    path, cfg = scan
    out = tmp_path / "seg.nii.gz"
    assert main(["-i", str(path), "-o", str(out), "--ml", "--passport", "-q", "--weights", "standin",
                 "--config", str(cfg), "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "approximate (bf16 network)" in err
    model = json.loads((tmp_path / "passport.json").read_text(encoding="utf-8"))["model"]
    assert model["arithmetic"]["approximate"] is True and model["arithmetic"]["precision"] == "bf16"
    exact = tmp_path / "exact.nii.gz"
    assert main(["-i", str(path), "-o", str(exact), "--ml", "-q", "--weights", "standin", "--config", str(cfg)]) == 0
    assert "approximate" not in capsys.readouterr().err
    a, b = (np.asanyarray(nib.load(p).dataobj) for p in (out, exact))
    assert a.shape == b.shape and (a != b).any()  # bf16 really ran: random weights make near-ties common


def test_python_api_bf16_warns_even_when_quiet(scan, capsys):
    from common.python_api import totalsegmentator

    path, cfg = scan
    img = totalsegmentator(path, None, ml=True, quiet=True, weights="standin", config=cfg, precision="bf16")
    assert isinstance(img, nib.Nifti1Image)
    assert "approximate (bf16 network)" in capsys.readouterr().out
