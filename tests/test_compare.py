"""07_compare_vanilla_vs_optimized.py on small hand-made results and label maps."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from helpers.compare_cases import LABELS, STANDIN, load_07
from helpers.label_maps import hand_maps

from common.core.atomic import leftover_temp_files
from common.imaging.mask_io import save_labels
from common.records.results import add_repeat, finalize_scan, new_result, new_scan_record, summarize, write_result

AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
ROOT = Path(__file__).resolve().parents[1]


def make_result(tmp_path: Path, name: str, method: str, times: list[float], mask: np.ndarray | None,
                model: dict = STANDIN, scan: str = "scan_a", stages_frac: float = 0.6) -> Path:
    res = new_result(f"{name}.py", method=method, settings={}, model=model)
    rec = new_scan_record(f"ct_data/{scan}.nii.gz", shape=(4, 4, 4), spacing_mm=(3, 3, 3), orientation="RAS")
    for t in times:
        add_repeat(rec, t, {"load": 0.1 * t, "inference": stages_frac * t, "save": 0.1 * t})
    finalize_scan(rec)
    if mask is not None:
        mask_path = save_labels(mask, AFFINE, tmp_path / "masks" / method / f"{scan}.nii.gz")
        rec["mask"] = str(mask_path)
        rec["labels_present"] = sorted(int(v) for v in np.unique(mask) if v)
    res["scans"].append(rec)
    summarize(res)
    return write_result(res, tmp_path / f"{name}.json")


@pytest.fixture()
def two_results(tmp_path):
    a, b = hand_maps()
    ref = make_result(tmp_path, "03_vanilla", "official_pytorch", [9.0, 10.0, 12.0], a)
    opt = make_result(tmp_path, "05_optimized", "optimized", [2.5, 2.4, 3.0], b, stages_frac=0.3)
    return tmp_path, ref, opt


def test_compare_two_results(two_results, capsys):
    tmp_path, ref, opt = two_results
    out = tmp_path / "out"
    gt_dir = tmp_path / "gt"
    a, _ = hand_maps()
    save_labels(a, AFFINE, gt_dir / "scan_a_seg.nii.gz")
    rc = load_07().main(["--results", str(ref), str(opt), "--out-dir", str(out), "--ground-truth", str(gt_dir)])
    assert rc == 0, capsys.readouterr().err
    md = (out / "comparison.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    assert lines[0].startswith("> **Stand-in weights") and "NOT" in lines[0]
    row = next(line for line in lines if line.startswith("| scan_a | optimized |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2.50 [2.40–3.00]"
    assert cells[3] == "4.00×"
    assert cells[4] == "50.000"  # voxel agreement %
    assert cells[5] == "0.4444"  # mean of 2/3, 2/3, 0
    assert cells[6] == "2 / 3"
    assert "extra: stomach" in cells[7] and "missing: none" in cells[7]
    ref_row = next(line for line in lines if line.startswith("| scan_a | official_pytorch |"))
    assert "10.00 [9.00–12.00]" in ref_row and "1.00×" in ref_row
    assert "different model weights" not in md

    doc = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert doc["schema"] == "ts-bench-comparison" and doc["schema_version"] == 1
    assert doc["models"]["standin"] is True and doc["models"]["same_weights"] is True
    assert doc["reference"]["method"] == "official_pytorch"
    assert {"cpu_model", "usable_cores"} <= set(doc["machine"]) and "numpy" in doc["versions"]
    assert doc["inputs"][0]["model"]["sha256"] == "ab" * 32
    r = next(r for r in doc["rows"] if r["method"] == "optimized")
    assert r["speedup"] == pytest.approx(4.0)
    assert r["voxel_agreement"] == pytest.approx(0.5)
    assert r["dice"] == pytest.approx({"1": 2 / 3, "2": 2 / 3, "3": 0.0})
    assert r["extra"] == ["stomach"] and r["missing"] == []
    m = doc["methods"]["optimized"]
    assert m["speedup_total"] == pytest.approx(4.0) and m["success_rate"] == 1.0
    assert m["latency"]["median"] == 2.5
    assert m["throughput_mvox_s"] == pytest.approx(64 / 2.5 / 1e6)
    assert m["dice_buckets"] == {">0.95": 0, "0.90-0.95": 0, "0.85-0.90": 0, "<0.85": 3}
    # ground truth equals the reference mask
    assert doc["methods"]["official_pytorch"]["gt_mean_dice"] == 1.0
    assert m["gt_dice_quantiles"]["p50"] == pytest.approx(2 / 3)
    assert "## Dice vs ground truth" in md

    for key in ("latency", "stages", "dice", "dice_ground_truth"):
        png = out / doc["plots"][key]
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, key
        assert f"]({png.name})" in md
    assert not leftover_temp_files(out)


def test_different_weights_and_mask_mismatch(two_results, capsys):
    tmp_path, ref, _ = two_results
    official = {"name": "Task297_fast", "weights": "official", "sha256": "cd" * 32, "labels": LABELS}
    odd = make_result(tmp_path, "04_onnx", "onnx_default", [5.0], np.zeros((4, 4, 5), np.uint8), model=official)
    out = tmp_path / "out2"
    assert load_07().main(["--results", str(odd), str(ref), "--out-dir", str(out)]) == 0
    md = (out / "comparison.md").read_text(encoding="utf-8")
    assert md.splitlines()[0].startswith("> **Stand-in weights")
    assert "different model weights" in md
    doc = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert doc["reference"]["method"] == "official_pytorch"  # chosen by method, not order
    r = next(r for r in doc["rows"] if r["method"] == "onnx_default")
    assert r["speedup"] == pytest.approx(2.0)
    assert r["voxel_agreement"] is None and "shape" in r["pair_error"]
    assert "dice" not in doc["plots"]  # no Dice data at all


def test_bad_input_exits_2_with_one_line(two_results, capsys):
    tmp_path, ref, _ = two_results
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    mod = load_07()
    assert mod.main(["--results", str(ref), str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err
    assert mod.main(["--results", str(tmp_path / "nope.json"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert not (tmp_path / "o" / "comparison.md").exists()


def test_defaults_skip_missing_results(two_results, monkeypatch, capsys):
    tmp_path, ref, opt = two_results
    mod = load_07()
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "03_vanilla.json").write_text(ref.read_text(encoding="utf-8"))
    (bench / "05_optimized.json").write_text(opt.read_text(encoding="utf-8"))
    monkeypatch.setattr(mod, "BENCHMARKS", bench)
    assert mod.main(["--out-dir", str(bench)]) == 0
    captured = capsys.readouterr()
    assert "04_onnx.json not found" in captured.err and "06_inference.json not found" in captured.err
    doc = json.loads((bench / "comparison.json").read_text(encoding="utf-8"))
    assert [i["method"] for i in doc["inputs"]] == ["official_pytorch", "optimized"]
    assert any("04_onnx.json" in n for n in doc["notes"])


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as info:
        load_07().main(["--help"])
    assert info.value.code == 0
    assert "--ground-truth" in capsys.readouterr().out


def test_official_weights_have_no_standin_line(tmp_path):
    a, b = hand_maps()
    official = {"name": "Task297_fast", "weights": "official", "sha256": "cd" * 32}
    ref = make_result(tmp_path, "03_vanilla", "official_pytorch", [4.0], a, model=official)
    opt = make_result(tmp_path, "06_inference", "inference_passport", [1.0], b, model=official)
    assert load_07().main(["--results", str(ref), str(opt), "--out-dir", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "comparison.md").read_text(encoding="utf-8")
    assert md.startswith("# TotalSegmentator")
    assert "Stand-in" not in md
    assert nib.load(str(tmp_path / "masks" / "official_pytorch" / "scan_a.nii.gz")).shape == (4, 4, 4)


def test_reference_by_method_name(two_results):
    tmp_path, ref, opt = two_results
    out = tmp_path / "o"
    assert load_07().main(["--results", str(ref), str(opt), "--reference", "optimized", "--out-dir", str(out)]) == 0
    doc = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert doc["reference"]["method"] == "optimized"
    r = next(r for r in doc["rows"] if r["method"] == "official_pytorch")
    assert r["speedup"] == pytest.approx(0.25)
    assert load_07().main(["--results", str(ref), "--reference", "nonsense", "--out-dir", str(out)]) == 2


GIB = 2**30
# scan id -> (shape, spacing, recorded tiles, official s, official RSS GiB, ours s, ours RSS GiB)
SIZED_SCANS = {
    "one_tile": ((122, 101, 112), (3.0, 3.0, 3.0), 1, 12.0, 2.0, 3.0, 1.5),
    "clinical_512x512x200": ((512, 512, 200), (0.98, 0.98, 2.0), 8, 80.0, 5.0, 40.0, 2.0),
    "clinical_512x512x500": ((512, 512, 500), (0.98, 0.98, 2.0), 16, 160.0, 8.0, 64.0, 3.2),
    "old_multi": ((512, 512, 200), (0.98, 0.98, 2.0), None, 90.0, None, 45.0, None),  # no tiles, no RSS
}


def make_sized_result(tmp_path: Path, name: str, method: str, official: bool) -> Path:
    """Hand-made result over scans of several sizes, with tile counts and peak RSS (no masks)."""
    res = new_result(f"{name}.py", method=method, settings={}, model=STANDIN)
    for sid, (shape, spacing, tiles, t_off, rss_off, t_ours, rss_ours) in SIZED_SCANS.items():
        rec = new_scan_record(f"ct_data/{sid}.nii.gz", shape=shape, spacing_mm=spacing, orientation="RAS")
        t, rss = (t_off, rss_off) if official else (t_ours, rss_ours)
        add_repeat(rec, t, {}, peak_rss_bytes=None if rss is None else int(rss * GIB),
                   peak_rss_method=None if rss is None else "vmhwm_reset")
        if tiles is not None and (official or sid != "clinical_512x512x200"):  # ours lacks one: from the reference
            rec["n_tiles"] = tiles
        if not official and sid == "clinical_512x512x500":  # as 06 --efficiency records them
            rec.update(inference_s_per_tile=3.5, efficiency=0.8)
        res["scans"].append(finalize_scan(rec))
    summarize(res)
    return write_result(res, tmp_path / f"{name}.json")


def test_report_shows_peak_rss_tiles_and_size_classes(tmp_path):
    ref = make_sized_result(tmp_path, "03_vanilla", "official_pytorch", official=True)
    ours = make_sized_result(tmp_path, "06_inference", "inference_passport", official=False)
    out = tmp_path / "out"
    assert load_07().main(["--results", str(ref), str(ours), "--out-dir", str(out)]) == 0
    doc = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    rows = {(r["scan_id"], r["method"]): r for r in doc["rows"]}
    r = rows[("clinical_512x512x500", "inference_passport")]
    assert r["n_tiles"] == 16 and r["size_class"] == "9-16 tiles" and r["n_tiles_source"] == "result"
    assert r["speedup"] == pytest.approx(2.5)
    assert r["peak_rss_bytes"] == int(3.2 * GIB) and r["ref_peak_rss_bytes"] == 8 * GIB
    assert r["rss_ratio"] == pytest.approx(0.4, rel=1e-6)
    assert rows[("clinical_512x512x200", "inference_passport")]["n_tiles_source"] == "reference"
    old = rows[("old_multi", "inference_passport")]
    assert old["n_tiles"] == 8 and old["n_tiles_source"] == "estimated" and old["rss_ratio"] is None

    classes = {(c["size_class"], c["method"]): c for c in doc["size_classes"]}
    multi = classes[("2-8 tiles", "inference_passport")]
    assert multi["n_scans"] == 2 and multi["median_speedup"] == pytest.approx(2.0)
    assert multi["median_rss_ratio"] == pytest.approx(0.4)  # only the scan with both figures
    assert classes[("1 tile", "inference_passport")]["median_speedup"] == pytest.approx(4.0)
    assert classes[("1 tile", "inference_passport")]["median_rss_ratio"] == pytest.approx(0.75)
    assert classes[("9-16 tiles", "official_pytorch")]["median_peak_rss_bytes"] == 8 * GIB
    m = doc["methods"]["inference_passport"]
    assert m["median_rss_ratio"] == pytest.approx(0.4) and m["max_peak_rss_bytes"] == int(3.2 * GIB)

    md = (out / "comparison.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    assert "## Time, memory and size per scan" in md and "## By size class" in md
    header = next(line for line in lines if line.startswith("| Scan | Tiles | Method |"))
    assert "Peak RSS (GiB)" in header and "RSS vs ref" in header and "Efficiency" in header
    row = next(line for line in lines if line.startswith("| clinical_512x512x500 | 16 | inference_passport |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:] == ["64.00", "2.50×", "3.20", "40 %", "3.50", "80 %"]
    assert r["inference_s_per_tile"] == 3.5 and r["efficiency"] == 0.8
    ref_row = next(line for line in lines if line.startswith("| clinical_512x512x500 | 16 | official_pytorch |"))
    assert "8.00" in ref_row and "(reference)" in ref_row
    assert any(line.startswith("| old_multi | 8 (est.) | inference_passport |") for line in lines)
    cls = next(line for line in lines if line.startswith("| 2-8 tiles | inference_passport |"))
    cells = [c.strip() for c in cls.strip("|").split("|")]
    assert cells[2:] == ["2/2", "8", "42.50", "2.00×", "2.00", "40 %"]
