"""The clinical app (registration/clinical_app.py) driven end to end, headless, with streamlit's AppTest: the real
segmentation (stand-in weights), the real registration, the real CT and its real label map.

- Single scan: the table's statistics.json figures are those of ``totalseg-fast --ml --statistics`` on the same
  scan; its label-map volumes and border flags are those of totalseg-fast's label map; the picker moves the slices.
- Follow-up: baseline = the shared CT with its real label map, follow-up = a known rigid + smooth warp of both
  (registration.synthetic); the residuals equal registration/register.py's on passports of the two label maps, the
  volumes and HU those of the two label maps; the flags follow the thresholds.
- 06's outputs are reused (same resume keys) and the app's are up to date for 06.
- Bad uploads (not a scan, a 2-D image, an MR, too large) give totalseg-fast's one line, and the app goes on.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers.clinical_app import app_options, choose, cli_lines, new_session, no_traceback, page_errors, without_path
from helpers.followup_cases import write_followup_pair


@pytest.fixture(scope="module")
def data(tmp_path_factory, standin_home, example_ct, example_ct_sm, example_seg_fast):
    """The app's data folder: example_ct, and the follow-up pair with its label maps (``*_seg``)."""
    root = tmp_path_factory.mktemp("clinical_app")
    pair = write_followup_pair(example_ct_sm, example_seg_fast, root / "data")
    shutil.copyfile(example_ct, root / "data" / "example_ct.nii.gz")
    return {"root": root, "folder": root / "data", "out06": root / "out06", **pair}


@pytest.fixture(scope="module")
def options(data):
    with app_options("--weights", "standin", "--data", str(data["folder"]), "--out", str(data["out06"])):
        yield


@pytest.fixture(scope="module")
def single(options, data):
    """One session that segmented example_ct with the model (single-scan mode)."""
    at = choose(new_session(), "single", scan="example_ct")
    return at.button(key="single_run").click().run()


@pytest.fixture(scope="module")
def official_like(data, tmp_path_factory):
    """``totalseg-fast -i example_ct -o seg.nii.gz --ml --statistics``: its label map (x, y, z) and statistics."""
    out = tmp_path_factory.mktemp("totalseg_fast") / "seg.nii.gz"
    cli_lines(["-i", str(data["folder"] / "example_ct.nii.gz"), "-o", str(out), "--ml", "--statistics",
               "--weights", "standin"])
    img = nib.load(out)
    return {"labels": np.asanyarray(img.dataobj), "zooms": img.header.get_zooms()[:3],
            "statistics": json.loads((out.parent / "statistics.json").read_text(encoding="utf-8"))}


def test_single_scan_table_is_totalseg_fast_statistics(single, official_like):
    from totalsegmentator.statistics import touches_border

    from common.imaging.labels import total_class_names

    no_traceback(single)
    assert not page_errors(single)
    assert single.error[0].value.startswith("**Stand-in weights.**")  # the banner
    rows = single.dataframe[0].value
    names, labels, stats = total_class_names(), official_like["labels"], official_like["statistics"]
    present = [int(k) for k in np.unique(labels) if k != 0]
    assert list(rows["structure"]) == [names[k] for k in present]
    voxel_mm3 = float(np.prod(official_like["zooms"]))
    for row in rows.to_dict("records"):
        k = row["label"]
        assert row["statistics_volume_mm3"] == stats[row["structure"]]["volume"]
        assert row["statistics_mean_hu"] == stats[row["structure"]]["intensity"]
        assert row["volume_ml"] == pytest.approx(np.count_nonzero(labels == k) * voxel_mm3 / 1000, rel=1e-12)
        assert row["touches_border"] == touches_border(labels == k)  # 3 mm scan: the official grid is this one
        if not row["touches_border"]:
            assert row["statistics_volume_mm3"] == pytest.approx(row["volume_ml"] * 1000, rel=1e-9)
    absent = set(stats) - set(rows["structure"])
    assert absent and all(stats[n]["volume"] == 0 for n in absent)
    result = single.session_state["single_result"]["result"]
    assert json.loads(result.files["statistics"].read_text(encoding="utf-8")) == stats
    assert [b.label for b in single.download_button] == [
        "Download label map (--ml)", "Download passport.json", "Download statistics.json"]
    assert len(single.get("image")) == 3  # axial, coronal, sagittal
    (bar,) = single.get("progress")  # the model's progress, tile by tile: example_ct is one 112 x 112 x 128 tile
    assert (bar.value, bar.text) == (100, "model: tile 1 of 1 — resampling back and writing the outputs…")


def test_the_structure_picker_moves_the_slices_to_the_structure(single):
    from registration import app_views

    shown = single.session_state["single_result"]
    name = shown["result"].names[int(shown["rows"][len(shown["rows"]) // 2]["label"])]
    picker = next(s for s in single.selectbox if s.key.endswith("_pick"))
    picker.set_value(name).run()
    no_traceback(single)
    label = next(k for k, v in shown["result"].names.items() if v == name)
    centre = app_views.centre_of(shown["labels"], label)
    sliders = {s.key.rsplit("_", 1)[1]: s.value for s in single.slider if s.key.startswith("single_")}
    assert sliders == {plane: centre[app_views.PLANE_AXIS[plane]] for plane in app_views.PLANES}


def _passport(scan, seg, names):
    from common.records.passport import build_passport

    img, lab = nib.load(scan), nib.load(seg)
    return build_passport(np.asanyarray(lab.dataobj), img.affine, names, scan={"file": str(scan)}, model={},
                          resolution="original")


def test_followup_residuals_are_register_py_and_volumes_the_label_maps(options, data, tmp_path):
    from common.imaging.labels import total_class_names
    from common.records.passport import save_passport, structure_by_name
    from registration import register
    from registration.transform import load_transform

    at = new_session()
    at.radio(key="mode").set_value("followup").run()
    choose(at, "baseline", scan="baseline", segmentation="baseline_seg.nii.gz")
    choose(at, "followup", scan="followup", segmentation="followup_seg.nii.gz")
    at.button(key="followup_run").click().run()
    no_traceback(at)
    assert not page_errors(at) and at.error[0].value.startswith("**Stand-in weights.**")  # the banner here too
    rows = {r["structure"]: r for r in at.dataframe[0].value.to_dict("records")}

    names = total_class_names()  # register.py on passports the test builds from the two label maps
    fixed, moving = _passport(data["baseline"], data["baseline_seg"], names), \
        _passport(data["followup"], data["followup_seg"], names)
    fp, mp = save_passport(fixed, tmp_path / "b.json"), save_passport(moving, tmp_path / "f.json")
    assert register.main(["--fixed-passport", str(fp), "--moving-passport", str(mp), "--fixed-scan",
                          str(data["baseline"]), "--moving-scan", str(data["followup"]), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "registration.json").read_text(encoding="utf-8"))
    transform = load_transform(tmp_path / "transform.json")
    f_by, m_by = structure_by_name(fixed), structure_by_name(moving)
    for name, residual in report["rigid"]["residuals_mm"].items():
        assert rows[name]["residual_rigid_mm"] == pytest.approx(residual, abs=1e-9)
        after = np.linalg.norm(transform.moving_to_fixed(m_by[name].centroid_mm[None])[0] - f_by[name].centroid_mm)
        assert rows[name]["residual_mm"] == pytest.approx(after, abs=1e-9)
        assert rows[name]["rigid_outlier"] == (name in report["rigid"]["outliers"])

    volumes = {}
    for side in ("baseline", "followup"):
        ct, lab = nib.load(data[side]), nib.load(data[f"{side}_seg"])
        hu, lab = np.asanyarray(ct.dataobj).astype(np.float64), np.asanyarray(lab.dataobj)
        voxel_ml = float(np.prod(ct.header.get_zooms()[:3])) / 1000
        volumes[side] = {names[k]: (np.count_nonzero(lab == k) * voxel_ml, hu[lab == k].mean())
                         for k in np.unique(lab) if k != 0}
    assert set(rows) == set(volumes["baseline"]) | set(volumes["followup"])
    for name, row in rows.items():
        (vb, hb), (vf, hf) = volumes["baseline"].get(name, (0.0, None)), volumes["followup"].get(name, (0.0, None))
        assert (row["volume_baseline_ml"], row["volume_followup_ml"]) == (pytest.approx(vb, rel=1e-12),
                                                                          pytest.approx(vf, rel=1e-12))
        if vb and vf:
            assert row["volume_change_pct"] == pytest.approx((vf - vb) / vb * 100, rel=1e-9)
            assert row["mean_hu_change"] == pytest.approx(hf - hb, abs=1e-6)

    for how in ("checkerboard", "contours", "blend"):  # the registered follow-up over the baseline
        next(r for r in at.radio if r.key.endswith("_how")).set_value(how).run()
        no_traceback(at)
        assert any(i.captions[0].endswith(
            {"blend": "follow-up 50%", "checkerboard": "registered follow-up", "contours": "white where equal"}[how])
            for i in at.get("image"))
    at.number_input(key="thr_volume").set_value(0.0).run()  # every structure in both scans is flagged
    flagged = {r["structure"]: r["flagged"] for r in at.dataframe[0].value.to_dict("records")}
    assert all("volume" in flag for flag in flagged.values())
    at.number_input(key="thr_volume").set_value(1e6).run()
    flagged = {r["structure"]: r["flagged"] for r in at.dataframe[0].value.to_dict("records")}
    assert all("volume" not in flagged[n] for n, r in rows.items() if r["volume_change_pct"] is not None
               and not np.isnan(r["volume_change_pct"]))
    assert [b.label for b in at.download_button][:4] == [
        "Download transform.json", "Download registration.json", "Download comparison.csv", "Download comparison.json"]


def _run_06(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert importlib.import_module("06_inferenceAndPassport").main([*argv, "--weights", "standin"]) == 0
    return out.getvalue()


def test_followup_reuses_06_and_what_it_segments_is_up_to_date_for_06(options, data):
    out06 = data["out06"]
    _run_06(["--input", str(data["baseline"]), "--out", str(out06), "--result", str(data["root"] / "06a.json")])
    mask = out06 / "baseline_seg.nii.gz"
    before = mask.stat().st_mtime_ns
    at = new_session()
    at.radio(key="mode").set_value("followup").run()
    choose(at, "baseline", scan="baseline")
    choose(at, "followup", scan="followup")
    at.checkbox(key="reg_deformable").uncheck()  # rigid only: the stand-in's random labels are no anatomy
    at.button(key="followup_run").click().run()
    no_traceback(at)
    lines = [m.value for m in at.markdown if m.value.startswith("**baseline:") or m.value.startswith("**follow-up:")]
    assert "reused 06's outputs" in lines[0] and "segmented now" in lines[1], lines
    assert mask.stat().st_mtime_ns == before  # not computed twice
    said = _run_06(["--input", str(data["followup"]), "--out", str(out06), "--result", str(data["root"] / "06b.json")])
    record = json.loads((data["root"] / "06b.json").read_text(encoding="utf-8"))
    assert [s["scan_id"] for s in record["skipped"]] == ["followup"] and not record["scans"], said


@pytest.mark.parametrize("name", ["notes.txt", "flat.nii.gz", "example_mr_sm.nii.gz"])
def test_a_bad_upload_gives_totalseg_fasts_one_line_and_the_app_goes_on(options, data, example_mr_sm, tmp_path, name):
    if name == "flat.nii.gz":
        nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), tmp_path / name)
    elif name == "notes.txt":
        (tmp_path / name).write_text("a radiology report, not a scan\n", encoding="utf-8")
    else:
        shutil.copyfile(example_mr_sm, tmp_path / name)
    expected = [without_path(line.removeprefix("FAILED "), name)
                for line in cli_lines(["-i", str(tmp_path / name), "-o", str(tmp_path / "o.nii.gz"), "--ml", "-q",
                                       "--weights", "standin"])]
    assert len(expected) == 1
    at = choose(new_session(), "single", upload=(name, (tmp_path / name).read_bytes()))
    at.button(key="single_run").click().run()
    no_traceback(at)
    shown = page_errors(at) + [w.value for w in at.warning]
    assert [without_path(line, name) for line in shown] == expected
    choose(at, "single", scan="baseline", segmentation="baseline_seg.nii.gz")  # the app goes on
    at.button(key="single_run").click().run()
    no_traceback(at)
    assert not page_errors(at) and len(at.dataframe) == 1


def test_the_server_listens_on_localhost_by_default():
    import tomllib

    from helpers.clinical_app import ROOT

    from registration.clinical_app import DEFAULT_UPLOAD_MB

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert config["server"]["address"] == "localhost" and config["browser"]["gatherUsageStats"] is False
    assert config["server"]["maxUploadSize"] == DEFAULT_UPLOAD_MB  # MB: the server's limit is the app's


def test_an_upload_over_the_limit_is_one_line(data, tmp_path):
    with app_options("--weights", "standin", "--data", str(data["folder"]), "--max-upload-mb", "1"):
        at = choose(new_session(), "single", upload=("big.nii.gz", bytes(1_500_000)))
    no_traceback(at)
    (line,) = page_errors(at)
    assert line.startswith("big.nii.gz: ") and line.endswith("is over the upload limit of 1.0 MiB"), line
    assert at.button(key="single_run").disabled  # nothing to run until another file is given


def test_the_model_session_is_built_once_per_server_process(single, options):
    at = choose(new_session(), "single", scan="baseline")  # another browser session segments another scan
    at.button(key="single_run").click().run()
    no_traceback(at)
    first = single.session_state["model_notes"]
    assert "model session built at" in first and at.session_state["model_notes"] == first  # the same object


def test_a_dicom_zip_with_an_uploaded_label_map(options, data, tmp_path, example_ct_sm, example_seg_fast):
    from helpers.dicom_files import write_series, zip_folder

    write_series(nib.load(example_ct_sm), tmp_path / "series")  # LPS slices: the label map (RAS) is reoriented
    archive = zip_folder(tmp_path / "series", tmp_path / "ct_series.zip")
    at = choose(new_session(), "single", upload=("ct_series.zip", archive.read_bytes()))
    at.radio(key="single_segmode").set_value("my own segmentation").run()
    at.selectbox(key="single_seg").set_value("upload…").run()
    at.file_uploader(key="single_seg_upload").set_value(
        [("example_seg_fast.nii.gz", example_seg_fast.read_bytes(), "application/gzip")]).run()
    at.button(key="single_run").click().run()
    no_traceback(at)
    assert not page_errors(at)
    source = next(m.value for m in at.markdown if m.value.startswith("**ct_series.zip**"))
    assert "your label map example_seg_fast.nii.gz (40 structures); reoriented" in source, source
    lab = nib.load(example_seg_fast)
    labels, voxel_ml = np.asanyarray(lab.dataobj), float(np.prod(lab.header.get_zooms()[:3])) / 1000
    rows = at.dataframe[0].value.to_dict("records")
    assert [r["label"] for r in rows] == [int(k) for k in np.unique(labels) if k != 0]
    for row in rows:
        assert row["volume_ml"] == pytest.approx(np.count_nonzero(labels == row["label"]) * voxel_ml, rel=1e-6)
