"""Stage 06 resume is keyed on input content, weights and configuration (<id>_run.json, written last).

Unit tests of common.records.resume, then the real 06 script on small crops of example_ct_sm (stand-in weights):
one batch is run, then scans are replaced / their run records deleted or edited, and re-runs must skip
exactly the unchanged scan and recompute the others, naming why.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json

import nibabel as nib
import numpy as np
import pytest

from common.inference.run_config import RunConfig, SegmentOptions, save_config
from common.records import resume
from common.records.results import read_result

# ------------------------------------------------------------------------------------------------ unit


def _key(input_sha="a" * 64, weights_sha="b" * 64, **cfg):
    config = resume.config_key({**RunConfig().to_dict(), **cfg}, passport_resolution="model", max_points=500,
                               no_passport=False)
    return resume.run_key(input_sha, weights_sha, config)


def test_stale_reasons_name_what_changed():
    base = _key()
    assert resume.stale_reasons(base, _key()) == []
    only_weights = resume.stale_reasons(base, _key(weights_sha="c" * 64))
    assert len(only_weights) == 1 and only_weights[0].startswith("weights")
    only_input = resume.stale_reasons(base, _key(input_sha="d" * 64))
    assert len(only_input) == 1 and only_input[0].startswith("input content")
    tiles = resume.stale_reasons(base, _key(segment={**SegmentOptions().to_dict(), "tile_step": 0.5}))
    assert len(tiles) == 1 and tiles[0].startswith("configuration") and "segment.tile_step: 0.8 -> 0.5" in tiles[0]
    assert resume.stale_reasons(None, base) == [resume.NO_RECORD]


def test_config_key_ignores_the_name_but_not_passport_options():
    named = RunConfig(name="whatever").to_dict()
    k = resume.config_key(named, passport_resolution="model", max_points=500, no_passport=False)
    assert k == resume.config_key(RunConfig(name="other").to_dict(), passport_resolution="model",
                                  max_points=500, no_passport=False)
    assert k != resume.config_key(named, passport_resolution="model", max_points=100, no_passport=False)
    assert k != resume.config_key(named, passport_resolution="original", max_points=500, no_passport=False)
    assert k != resume.config_key(named, passport_resolution="model", max_points=500, no_passport=True)


def test_input_digest_of_a_file_and_of_a_folder(tmp_path):
    f = tmp_path / "big.bin"
    data = np.random.default_rng(0).bytes(3 * resume.CHUNK + 123)  # several chunks
    f.write_bytes(data)
    assert resume.input_digest(f) == hashlib.sha256(data).hexdigest()
    series = tmp_path / "series"
    (series / "sub").mkdir(parents=True)
    (series / "1.dcm").write_bytes(b"one")
    (series / "sub" / "2.dcm").write_bytes(b"two")
    d0 = resume.input_digest(series)
    assert d0 == resume.input_digest(series)
    (series / "1.dcm").write_bytes(b"One")
    d1 = resume.input_digest(series)
    assert d1 != d0
    (series / "1.dcm").rename(series / "0.dcm")  # same bytes, another name
    assert resume.input_digest(series) != d1


def test_read_key_rejects_bad_records(tmp_path):
    p = tmp_path / "x_run.json"
    with pytest.raises(FileNotFoundError):
        resume.read_key(p)
    p.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError):
        resume.read_key(p)
    p.write_text(json.dumps({**_key(), "schema_version": 99}), encoding="utf-8")
    with pytest.raises(ValueError):
        resume.read_key(p)
    resume.write_key(p, _key(), scan="x.nii.gz")
    assert resume.stale_reasons(resume.read_key(p), _key()) == []
    mask = tmp_path / "x_seg.nii.gz"
    assert resume.recompute_reasons(p, _key(), [mask])[0].startswith("outputs missing")
    mask.write_bytes(b"")
    assert resume.recompute_reasons(p, _key(), [mask]) == []
    p.write_text("[]", encoding="utf-8")
    assert resume.recompute_reasons(p, _key(), [mask])[0].startswith("unreadable run record")


# ------------------------------------------------------------------------------------------ the script

NAMES = ("same", "replaced", "nosidecar", "weights")


def _run_06(argv: list[str], **patches) -> tuple[int, dict, str]:
    """06's main() in-process on the stand-in of the current project home (the `batch` fixture points it at
    the small-tile stand-in: the real network, PyTorch backend), with ``patches`` on common.records.passport (fault
    injection); returns the exit code, the result JSON and what it printed to stdout."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        argv = [*argv, "--weights", "standin"]
        for name, value in patches.items():
            mp.setattr(f"common.records.passport.{name}", value)
        code = importlib.import_module("06_inferenceAndPassport").main(argv)
    return code, read_result(argv[argv.index("--result") + 1]), out.getvalue()


def _by_id(result: dict) -> dict:
    return {s["scan_id"]: s for s in result["scans"]}


def _mtimes(out) -> dict:
    return {n: (out / f"{n}_seg.nii.gz").stat().st_mtime_ns for n in NAMES}


def _failing_save(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.fixture(scope="module")
def batch(tmp_path_factory, example_ct_sm, tiny_standin_home):
    """06 on four crops of example_ct_sm; three are then changed in three ways and 06 runs again; then one
    scan is recomputed under another configuration, once interrupted by a failing passport write."""
    from common.inference.weights import PROJECT_HOME_ENV

    with pytest.MonkeyPatch.context() as env:  # undone at module teardown, also when a run here fails
        env.setenv(PROJECT_HOME_ENV, str(tiny_standin_home))  # the small-tile stand-in for every 06 run here
        d = tmp_path_factory.mktemp("resume")
        scans, out = d / "scans", d / "out"
        scans.mkdir()
        img = nib.load(example_ct_sm)
        for i, name in enumerate(NAMES):
            nib.save(img.slicer[45 + i:75, 35:65, 5:25], scans / f"{name}.nii.gz")  # ~30 x 30 x 20 voxels: one tile
        # the pytorch backend: the real network without an ONNX export
        cfg_a = save_config(RunConfig(backend="pytorch", name="A"), d / "config_a.json")
        cfg_a2 = save_config(RunConfig(backend="pytorch", name="A under another name"), d / "config_a2.json")
        cfg_b = save_config(RunConfig(backend="pytorch", name="B", segment=SegmentOptions(tile_step=0.5)),
                            d / "config_b.json")
        base = ["--out", str(out), "--onnx", str(d / "unused.onnx")]
        one = ["--input", str(scans / "same.nii.gz"), *base]

        runs = {"first": _run_06(["--input", str(scans), "--result", str(d / "1.json"), "--config", str(cfg_a), *base])}
        mtimes_1 = _mtimes(out)
        keys_1 = {n: json.loads((out / f"{n}_run.json").read_text(encoding="utf-8")) for n in NAMES}
        sha_1 = {n: hashlib.sha256((scans / f"{n}.nii.gz").read_bytes()).hexdigest() for n in NAMES}

        rep = nib.load(scans / "replaced.nii.gz")  # same name, other content: the crop flipped left-right
        flipped = nib.Nifti1Image(np.ascontiguousarray(np.asanyarray(rep.dataobj)[::-1]), rep.affine, rep.header)
        nib.save(flipped, scans / "replaced.nii.gz")
        (out / "nosidecar_run.json").unlink()  # outputs as an older version of 06 left them
        (out / "weights_run.json").write_text(json.dumps({**keys_1["weights"], "weights_sha256": "0" * 64}),
                                              encoding="utf-8")
        runs["second"] = _run_06(["--input", str(scans), "--result", str(d / "2.json"), "--config", str(cfg_a2), *base])
        mtimes_2 = _mtimes(out)
        runs["third"] = _run_06([*one, "--result", str(d / "3.json"), "--config", str(cfg_b)])
        runs["max_points"] = _run_06([*one, "--result", str(d / "4.json"), "--config", str(cfg_b), "--max-points", "50"])
        # back to A, but the passport write fails after the mask was written: the set of the B run must stay
        # exactly as it was (mask, passport and run record), and nothing of the failed A run may remain
        files = [out / f"same{suffix}" for suffix in ("_seg.nii.gz", "_passport.json", "_run.json")]
        before_failure = [p.read_bytes() for p in files]
        runs["interrupted"] = _run_06([*one, "--result", str(d / "5.json"), "--config", str(cfg_a)],
                                      save_passport=_failing_save)
        set_kept = [p.read_bytes() for p in files] == before_failure
        leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-"))
        runs["after_failure"] = _run_06([*one, "--result", str(d / "6.json"), "--config", str(cfg_b),
                                         "--max-points", "50"])
        yield {"scans": scans, "out": out, **runs, "mtimes": (mtimes_1, mtimes_2), "keys_1": keys_1,
               "sha_1": sha_1, "set_kept": set_kept, "leftovers": leftovers}


def test_first_run_writes_the_run_record_last(batch):
    code, res, _ = batch["first"]
    assert code == 0 and res["skipped"] == []
    out = batch["out"]
    for name in NAMES:
        rec = _by_id(res)[name]
        assert rec["status"] == "ok" and "recomputed_because" not in rec
        run = out / f"{name}_run.json"
        assert run.stat().st_mtime_ns >= (out / f"{name}_passport.json").stat().st_mtime_ns
        assert run.stat().st_mtime_ns >= (out / f"{name}_seg.nii.gz").stat().st_mtime_ns
        key = batch["keys_1"][name]
        assert key["input_sha256"] == batch["sha_1"][name]
        assert key["weights_sha256"] == res["model"]["sha256"] and len(key["weights_sha256"]) == 64
        assert "name" not in key["config"]["run_config"]
        assert key["config"]["passport"] == {"resolution": "model", "max_points": 500}


def test_unchanged_scan_is_skipped_even_under_a_renamed_config(batch):
    code, res, stdout = batch["second"]
    assert code == 0
    assert [s["file"] for s in res["skipped"]] == [str(batch["scans"] / "same.nii.gz")]
    assert "same" not in _by_id(res) and "recomputing same" not in stdout
    before, after = batch["mtimes"]
    assert after["same"] == before["same"]


def test_replaced_content_missing_record_and_other_weights_recompute(batch):
    _, res, stdout = batch["second"]
    scans = _by_id(res)
    assert set(scans) == {"replaced", "nosidecar", "weights"}
    assert all(s["status"] == "ok" for s in scans.values())
    assert scans["replaced"]["recomputed_because"] == ["input content changed (same name, different sha256)"]
    assert scans["nosidecar"]["recomputed_because"] == [resume.NO_RECORD]
    (why,) = scans["weights"]["recomputed_because"]
    assert why.startswith("weights changed (sha256 000000000000…")
    before, after = batch["mtimes"]
    assert all(after[n] != before[n] for n in ("replaced", "nosidecar", "weights"))
    assert "recomputing replaced: input content changed" in stdout
    assert "recomputing nosidecar: no run record" in stdout
    assert "recomputing weights: weights changed" in stdout
    out = batch["out"]
    for n in ("replaced", "nosidecar", "weights"):  # their records are current again
        current = batch["keys_1"]["same"] | {"input_sha256": resume.input_digest(batch["scans"] / f"{n}.nii.gz")}
        assert resume.recompute_reasons(out / f"{n}_run.json", current,
                                        [out / f"{n}_seg.nii.gz", out / f"{n}_passport.json"]) == []


def test_other_configuration_recomputes(batch):
    code, res, stdout = batch["third"]
    assert code == 0 and res["skipped"] == []
    (why,) = _by_id(res)["same"]["recomputed_because"]
    assert why.startswith("configuration changed") and "segment.tile_step: 0.8 -> 0.5" in why
    assert "recomputing same: configuration changed" in stdout
    code, res, _ = batch["max_points"]
    assert code == 0 and res["skipped"] == []
    (why,) = _by_id(res)["same"]["recomputed_because"]
    assert why == "configuration changed (passport.max_points: 500 -> 50)"


def test_a_failed_recompute_leaves_the_earlier_set_as_it_was(batch):
    code, res, _ = batch["interrupted"]
    assert code == 1 and _by_id(res)["same"]["status"] == "failed"
    assert "disk full" in _by_id(res)["same"]["error"]
    # nothing of the failed run remains: the B run's mask, passport and record are byte-identical, and no
    # staging folder or temporary file is left in the output folder
    assert batch["set_kept"] and batch["leftovers"] == []
    # so the next B run finds its own complete set up to date
    code, res, _ = batch["after_failure"]
    assert code == 0 and [s["file"] for s in res["skipped"]] == [str(batch["scans"] / "same.nii.gz")]
