"""Clinical-size inputs (01 --clinical), tile counts, and peak memory recorded per scan (issue 9)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from helpers.script_loader import load_script
from scipy import ndimage

from common.core.atomic import leftover_temp_files
from common.core.peak_memory import METHOD_OFFICIAL_WORKER, METHOD_RUSAGE, METHOD_VMHWM, reset_peak, track_peak_rss
from common.inference.model import Normalization
from common.inference.tile_count import tile_band, tiles_for_scan
from common.records.results import (
    add_repeat,
    finalize_scan,
    new_result,
    new_scan_record,
    read_result,
    summarize,
    write_result,
)
from common.sources.variants import CLINICAL_SPACING_MM, clinical_variant, plan_clinical, reorient

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# Task 297's numbers as plans.json gives them (nnU-Net axes (z, y, x), identity transpose)
TASK297 = SimpleNamespace(spacing_xyz=(3.0, 3.0, 3.0), patch_size=(112, 112, 128), transpose_forward=(0, 1, 2))


def load_01():
    return load_script("01_download_data.py")


def _spacing(img) -> np.ndarray:
    return np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)


# ---------------------------------------------------------------------------------------- 01 --clinical


def test_default_clinical_sizes_plan_8_16_and_32_tiles(example_ct):
    """The real default sizes (and the whole-body one), planned from the header only: no 500 MB written."""
    src = nib.load(str(example_ct))
    expected = {200: 8, 500: 16, 1000: 32}
    for slices, tiles in expected.items():
        plan = plan_clinical(src.shape, src.affine, (512, 512, slices))
        assert plan.shape == (512, 512, slices)
        assert plan.name == f"clinical_512x512x{slices}.nii.gz"
        assert np.allclose(_spacing(SimpleNamespace(affine=plan.affine)), CLINICAL_SPACING_MM, atol=1e-5)
        assert 0.8 <= plan.spacing_mm[0] <= 1.0 and plan.spacing_mm[2] == 2.0
        # in-plane: the 366 x 303 mm source field of view sits centred in 502 mm of air
        (bx, ax), (by, ay), (bz, az) = plan.pads
        assert bx > 0 and by > 0 and bx + ax + plan.resampled_shape[0] == 512 and bz == 0
        assert az == slices - plan.resampled_shape[2]  # mirrored copies after the last slice
        assert tiles_for_scan(plan.shape, plan.spacing_mm, TASK297) == tiles
    # the centre of the source's first voxel keeps its world position (origin moved by the centred pad)
    plan = plan_clinical(src.shape, src.affine, (512, 512, 200))
    ijk = np.array([plan.pads[0][0], plan.pads[1][0], 0, 1.0])
    assert np.allclose((plan.affine @ ijk)[:3], np.asarray(src.affine)[:3, 3], atol=1e-3)


def test_01_clinical_writes_small_scans_from_real_ct(example_ct, tmp_path, capsys):
    out = tmp_path / "ct_data"
    mod = load_01()
    code = mod.main(["--out", str(out), "--clinical", "--clinical-sizes", "128x128x40,96x96x200",
                     "--clinical-source", str(example_ct)])
    assert code == 0, capsys.readouterr().err
    src = nib.load(str(example_ct))
    src_data = np.asanyarray(src.dataobj).astype(np.float64)
    for shape in ((128, 128, 40), (96, 96, 200)):
        path = out / "clinical" / "clinical_{}x{}x{}.nii.gz".format(*shape)
        img = nib.load(str(path))
        assert img.shape == shape and img.get_data_dtype() == np.int16
        assert np.allclose(img.header.get_zooms()[:3], CLINICAL_SPACING_MM, atol=1e-5)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        data = np.asanyarray(img.dataobj)
        # affine consistency: voxels of the original z range show what the source shows at that world point
        to_src = np.linalg.inv(np.asarray(src.affine)) @ np.asarray(img.affine)
        rng = np.random.default_rng(0)
        ijk = np.stack([rng.integers(0, shape[0], 300), rng.integers(0, shape[1], 300), rng.integers(0, 40, 300)])
        src_ijk = to_src[:3, :3] @ ijk + to_src[:3, 3:4]
        inside = np.all((src_ijk >= 0) & (src_ijk <= np.array(src.shape)[:, None] - 1), axis=0)
        assert inside.sum() > 100
        expected = ndimage.map_coordinates(src_data, src_ijk[:, inside], order=1, mode="nearest")
        assert np.abs(data[tuple(ijk[:, inside])] - expected).max() <= 1.0
    # z beyond the source: mirrored (np.pad 'symmetric'), slice after the last = the last
    tall = np.asanyarray(nib.load(str(out / "clinical" / "clinical_96x96x200.nii.gz")).dataobj)
    n = plan_clinical(src.shape, src.affine, (96, 96, 200)).resampled_shape[2]
    assert np.array_equal(tall[:, :, n], tall[:, :, n - 1]) and np.array_equal(tall[:, :, n + 5], tall[:, :, n - 6])
    assert not leftover_temp_files(out)
    # second run keeps what exists
    assert mod.main(["--out", str(out), "--clinical", "--clinical-sizes", "128x128x40",
                     "--clinical-source", str(example_ct)]) == 0
    assert "kept existing" in capsys.readouterr().out


def test_clinical_variant_pads_with_air_and_mirrors_exactly(example_ct_sm):
    """At the source's own spacing nothing is interpolated: the scan sits unchanged inside the padding."""
    src = nib.load(str(example_ct_sm))  # 122 x 101 x 30 at 3 mm, RAS
    s = np.asanyarray(src.dataobj)
    out = clinical_variant(src, (130, 110, 70), (3.0, 3.0, 3.0))
    d = np.asanyarray(out.dataobj)
    assert d.shape == (130, 110, 70) and d.dtype == np.int16
    assert np.array_equal(d[4:126, 4:105, :30], s)
    assert (d[:4] == -1024).all() and (d[:, 105:] == -1024).all()
    assert np.array_equal(d[4:126, 4:105, 30:60], s[:, :, ::-1])
    assert np.allclose(np.asarray(out.affine) @ [4, 4, 0, 1], np.asarray(src.affine) @ [0, 0, 0, 1])
    # another orientation gives the same RAS result
    lps = clinical_variant(reorient(src, "LPS"), (130, 110, 70), (3.0, 3.0, 3.0))
    assert np.array_equal(np.asanyarray(lps.dataobj), d)
    assert np.allclose(lps.affine, out.affine, atol=1e-4)


def test_clinical_sizes_option():
    mod = load_01()
    args = mod.build_parser().parse_args(["--clinical"])
    assert mod._clinical_sizes(args.clinical_sizes) == [(512, 512, 200), (512, 512, 500)]
    assert mod._clinical_sizes("200,500,1000")[-1] == (512, 512, 1000)
    assert mod._clinical_sizes("64x80x30") == [(64, 80, 30)]
    with pytest.raises(SystemExit):
        mod.build_parser().parse_args(["--clinical-sizes", "big"])


def test_default_inputs_include_clinical_scans_last(tmp_path, monkeypatch):
    import common.sources.inputs as inputs

    for rel in ("a.nii.gz", "realistic/a_realistic.nii.gz", "clinical/clinical_512x512x200.nii.gz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    monkeypatch.setattr(inputs, "CT_DATA", tmp_path)
    batch = inputs.resolve_inputs(None)
    assert [p.relative_to(tmp_path).as_posix() for p in batch.scans] == [
        "a.nii.gz", "realistic/a_realistic.nii.gz", "clinical/clinical_512x512x200.nii.gz"]
    assert list(batch.ids.values()) == ["a", "a_realistic", "clinical_512x512x200"]  # the ids of earlier runs
    assert "3 scans" in batch.source


# ------------------------------------------------------------------------------------------- tile counts


def test_tiles_for_scan_equals_the_pipelines_count():
    """common.inference.tile_count follows segment(): the count from the header equals the tiles the pipeline runs, for
    odd spacings and a non-RAS orientation (small model numbers keep it fast)."""
    from common.inference.pipeline import segment
    from common.inference.run_config import SegmentOptions

    spec = SimpleNamespace(spacing_xyz=(3.0, 3.0, 3.0), patch_size=(8, 12, 16), transpose_forward=(0, 1, 2),
                           transpose_backward=(0, 1, 2), num_classes=3,
                           normalization=Normalization("CTNormalization", 0.0, 100.0, -1000.0, 1000.0))

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.zeros((batch.shape[0], 3, *batch.shape[2:]), dtype=np.float32)

    data = np.full((40, 50, 30), -1000, dtype=np.int16)
    data[10:30, 10:40, 5:25] = 40
    img = nib.Nifti1Image(data, np.diag([2.0, 1.5, 2.5, 1.0]))
    for image in (img, reorient(img, "LPS"), reorient(img, "SAR")):
        res = segment(image, spec, predict, SegmentOptions())
        orient = "".join(nib.aff2axcodes(image.affine))
        n = tiles_for_scan(image.shape, _spacing(image), spec, orient)
        assert res.n_tiles == n > 1, orient


def test_tile_bands():
    assert [tile_band(n) for n in (None, 1, 2, 8, 9, 16, 17, 32)] == [
        "unknown", "1 tile", "2-8 tiles", "2-8 tiles", "9-16 tiles", "9-16 tiles", ">16 tiles", ">16 tiles"]


# ------------------------------------------------------------------------------------------ peak memory


def test_track_peak_rss_measures_a_block_and_resets_between_blocks():
    if not reset_peak():
        pytest.skip("/proc/self/clear_refs is not writable here")
    size = 300 * MIB
    import mmap

    with track_peak_rss() as big:
        # a fresh anonymous mapping, every page touched: resident whatever malloc keeps from earlier tests (the
        # suite's in-process segmentations keep freed memory, common.core.heap, which np.ones would reuse)
        buf = mmap.mmap(-1, size)
        np.frombuffer(buf, dtype=np.uint8)[::mmap.PAGESIZE] = 1
        buf.close()
    assert big.method == METHOD_VMHWM
    assert big.peak_bytes >= size
    assert big.peak_bytes - big.start_bytes >= 0.95 * size
    with track_peak_rss() as small:
        np.ones(MIB // 8).sum()
    assert small.method == METHOD_VMHWM
    assert small.peak_bytes < big.peak_bytes - 0.8 * size  # the counter was reset: the earlier peak is gone


def test_track_peak_rss_falls_back_to_rusage(monkeypatch):
    import common.core.peak_memory as pm

    monkeypatch.setattr(pm, "reset_peak", lambda: False)
    with pm.track_peak_rss() as rec:
        pass
    assert rec.method == METHOD_RUSAGE and rec.peak_bytes > 10 * MIB


def _fake_run(alloc_bytes: int, extra: dict | None = None):
    def run(scan, mask_path):
        buf = np.ones(alloc_bytes // 8)
        total = float(buf[:1].sum())
        del buf
        out = (total, {"inference": total}, np.zeros((2, 2, 2), np.uint8))
        return out if extra is None else (*out, extra)

    return run


def test_benchmark_scan_records_peak_rss_and_tiles(example_ct_sm, tmp_path):
    from common.runs.bench import benchmark_scan

    if not reset_peak():
        pytest.skip("/proc/self/clear_refs is not writable here")
    rec = benchmark_scan(example_ct_sm, _fake_run(200 * MIB, {"n_tiles": 8}), tmp_path / "m.nii.gz", repeats=2)
    assert rec["status"] == "ok", rec["error"]
    assert rec["peak_rss_method"] == METHOD_VMHWM and rec["peak_rss_bytes"] >= 200 * MIB
    assert rec["peak_rss_bytes"] == max(r["peak_rss_bytes"] for r in rec["repeats"])
    assert rec["n_tiles"] == 8
    # a run that measured its peak elsewhere (the official worker) is taken as reported
    official = {"peak_rss_bytes": 5 * 2**30, "peak_rss_method": METHOD_OFFICIAL_WORKER}
    rec = benchmark_scan(example_ct_sm, _fake_run(MIB, official), tmp_path / "m.nii.gz", repeats=1)
    assert rec["peak_rss_bytes"] == 5 * 2**30 and rec["peak_rss_method"] == METHOD_OFFICIAL_WORKER
    # an old-style RunFn (three values) still works and is measured here
    rec = benchmark_scan(example_ct_sm, _fake_run(MIB), tmp_path / "m.nii.gz", repeats=1, warmup=0)
    assert rec["status"] == "ok" and rec["peak_rss_bytes"] > 0 and rec["n_tiles"] is None


def test_03_records_the_official_workers_peak_and_the_tile_count(example_ct_sm, tmp_path, monkeypatch):
    """03's RunFn passes the isolated worker's peak RSS (OfficialCall) into the scan record."""
    import common.runs.official as official
    from common.runs.bench import benchmark_scan

    calls = []

    class FakeRunner:
        def __init__(self, weights_folder):
            self.peak = 1_000_000_000

        def start(self):
            pass

        def close(self):
            pass

        def segment(self, scan, out, device="cpu", timeout_s=None):
            img = nib.load(str(scan))
            nib.save(nib.Nifti1Image(np.ones(img.shape, np.uint8), img.affine), str(out))
            self.peak += 1000  # ru_maxrss only grows within one worker
            calls.append(self.peak)
            return official.OfficialCall(total_s=0.1, peak_rss_bytes=self.peak, worker_pid=1)

    monkeypatch.setattr(official, "OfficialRunner", FakeRunner)
    s03 = importlib.import_module("03_vanilla_benchmark")
    run = s03.official_runner(tmp_path, "cpu", None, spec=TASK297)
    try:
        rec = benchmark_scan(example_ct_sm, run, tmp_path / "m03" / "x_seg.nii.gz", repeats=2, warmup=1)
    finally:
        run.close()
    assert rec["status"] == "ok", rec["error"]
    assert rec["peak_rss_bytes"] == max(calls) and rec["peak_rss_method"] == METHOD_OFFICIAL_WORKER
    assert [r["peak_rss_bytes"] for r in rec["repeats"]] == calls[1:]
    assert rec["n_tiles"] == 1


# ----------------------------------------------------------------------------------------- result schema


def test_result_schema_keeps_old_files_and_checks_the_new_fields(tmp_path):
    model = {"name": "Task297_fast_standin", "weights": "standin", "sha256": "ab" * 32}
    res = new_result("04_onnx_benchmark.py", method="onnx_default", settings={}, model=model)
    rec = new_scan_record("ct_data/x.nii.gz", shape=(10, 10, 10), spacing_mm=(1, 1, 1), orientation="RAS")
    add_repeat(rec, 1.0, {"inference": 0.5}, peak_rss_bytes=300, peak_rss_method=METHOD_VMHWM)
    add_repeat(rec, 1.0, {"inference": 0.5}, peak_rss_bytes=200, peak_rss_method=METHOD_VMHWM)
    rec["n_tiles"] = 8
    res["scans"].append(finalize_scan(rec))
    summarize(res)
    path = write_result(res, tmp_path / "new.json")
    back = read_result(path)["scans"][0]
    assert back["peak_rss_bytes"] == 300 and back["peak_rss_method"] == METHOD_VMHWM and back["n_tiles"] == 8
    # a file written before these fields existed still loads
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in ("peak_rss_bytes", "peak_rss_method", "n_tiles"):
        del old["scans"][0][key]
    for r in old["scans"][0]["repeats"]:
        del r["peak_rss_bytes"]
    (tmp_path / "old.json").write_text(json.dumps(old), encoding="utf-8")
    assert read_result(tmp_path / "old.json")["scans"][0]["status"] == "ok"
    # mistyped values are refused
    from common.core.errors import InputError

    for key, value in (("peak_rss_bytes", "5 GB"), ("n_tiles", -1), ("peak_rss_method", 3)):
        bad = json.loads(path.read_text(encoding="utf-8"))
        bad["scans"][0][key] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
        with pytest.raises(InputError, match=key):
            read_result(tmp_path / "bad.json")
    with pytest.raises(ValueError):
        add_repeat(rec, 1.0, {}, peak_rss_bytes=-1)
