"""common.sources.download, common.imaging.archives + 01_download_data.py against a real local HTTP server
(tests/helpers/http_server.py: Range support, dropped connections)."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.dicom_files import write_dicom_series
from helpers.http_server import local_server, url_of
from helpers.script_loader import load_script

from common.core.atomic import leftover_temp_files
from common.core.errors import DownloadError
from common.imaging.archives import extract_spleen
from common.sources import download
from common.sources.download import download_file

ROOT = Path(__file__).resolve().parents[1]


cli = load_script("01_download_data.py")


# ---- local HTTP server (tests/helpers/http_server.py) -------------------------------------------------
@pytest.fixture
def server():
    with local_server() as httpd:
        yield httpd


# ---- test archives made from the real CT ------------------------------------------------------
def _nifti_bytes(img: nib.Nifti1Image) -> bytes:
    """The .nii.gz file content of ``img``."""
    return gzip.compress(img.to_bytes())


@pytest.fixture(scope="module")
def crops(example_ct_sm) -> dict[str, nib.Nifti1Image]:
    src = nib.load(str(example_ct_sm))
    data = np.asanyarray(src.dataobj)
    out = {}
    for i, name in enumerate(["spleen_10", "spleen_2", "spleen_3"]):
        crop = np.ascontiguousarray(data[30 + 5 * i: 60 + 5 * i, 30:60, 5:20]).astype(np.int16)
        affine = np.array(src.affine, dtype=np.float64)
        affine[:3, 3] = affine[:3, :3] @ np.array([30 + 5 * i, 30, 5]) + affine[:3, 3]
        out[name] = nib.Nifti1Image(crop, affine)
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def spleen_tar(crops) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "Task09_Spleen/dataset.json", b"{}")
        for name, img in crops.items():
            _add(tar, f"Task09_Spleen/imagesTr/{name}.nii.gz", _nifti_bytes(img))
            _add(tar, f"Task09_Spleen/labelsTr/{name}.nii.gz", _nifti_bytes(img))
        _add(tar, "Task09_Spleen/imagesTr/._spleen_2.nii.gz", b"\0\5\26\7 macOS resource fork junk")
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def assert_one_line(msg: str, *words: str) -> None:
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


# ---- download_file ----------------------------------------------------------------------------
def test_full_download_and_extraction_via_cli(server, spleen_tar, crops, tmp_path, monkeypatch, capsys):
    server.state.files["/Task09_Spleen.tar"] = spleen_tar
    monkeypatch.setitem(download.SOURCES, "spleen", dataclasses.replace(
        download.SPLEEN, url=url_of(server, "/Task09_Spleen.tar"), md5=_md5(spleen_tar)))
    out = tmp_path / "ct_data"
    assert cli.main(["--out", str(out), "--max-samples", "2", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["spleen_2.nii.gz", "spleen_3.nii.gz"]  # natural order
    for name in ("spleen_2", "spleen_3"):
        got = nib.load(str(out / f"{name}.nii.gz"))
        assert np.array_equal(np.asanyarray(got.dataobj), np.asanyarray(crops[name].dataobj))
        assert np.allclose(got.affine, crops[name].affine, atol=1e-4)
    assert not list(out.rglob("._*"))
    assert (out / "downloads" / "Task09_Spleen.tar").read_bytes() == spleen_tar
    assert not list(out.rglob("*.part")) and leftover_temp_files(out) == []
    assert len(server.state.requests) == 1

    # re-run: archive verifies locally, outputs exist -> no request, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert cli.main(["--out", str(out), "--max-samples", "2", "--no-progress"]) == 0
    assert len(server.state.requests) == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    assert "kept existing" in capsys.readouterr().out

    # more samples later: only the new scan is written, existing ones kept
    assert cli.main(["--out", str(out), "--max-samples", "3", "--no-progress"]) == 0
    assert (out / "spleen_10.nii.gz").is_file()
    assert (out / "spleen_2.nii.gz").stat().st_mtime_ns == mtimes[out / "spleen_2.nii.gz"]


def test_interrupted_download_resumes_with_range(server, spleen_tar, tmp_path):
    server.state.files["/a.tar"] = spleen_tar
    k = len(spleen_tar) // 3
    server.state.drop_after = k
    dest = tmp_path / "a.tar"
    part = tmp_path / "a.tar.part"
    with pytest.raises(DownloadError) as exc:
        download_file(url_of(server, "/a.tar"), dest, md5=_md5(spleen_tar), progress=False)
    assert_one_line(str(exc.value), "interrupted at", "connection dropped", "re-run to resume", str(part))
    assert not dest.exists()
    assert part.stat().st_size == k

    assert download_file(url_of(server, "/a.tar"), dest, md5=_md5(spleen_tar), progress=False) == dest
    assert [r["range"] for r in server.state.requests] == [None, f"bytes={k}-"]  # resumed, nothing lost
    assert dest.read_bytes() == spleen_tar and not part.exists()


def test_server_ignoring_range_restarts(server, spleen_tar, tmp_path):
    server.state.files["/a.tar"] = spleen_tar
    server.state.support_range = False
    (tmp_path / "a.tar.part").write_bytes(b"garbage from an older attempt")
    dest = download_file(url_of(server, "/a.tar"), tmp_path / "a.tar", expected_size=len(spleen_tar),
                         sha256=hashlib.sha256(spleen_tar).hexdigest(), progress=False)
    assert server.state.requests[0]["range"] is not None  # asked to resume, got 200: restarted
    assert dest.read_bytes() == spleen_tar


def test_complete_part_left_before_rename_is_finished(server, spleen_tar, tmp_path):
    server.state.files["/a.tar"] = spleen_tar
    (tmp_path / "a.tar.part").write_bytes(spleen_tar)  # crash between verification and rename
    dest = download_file(url_of(server, "/a.tar"), tmp_path / "a.tar", md5=_md5(spleen_tar), progress=False)
    assert dest.read_bytes() == spleen_tar  # server answered 416; the complete .part was verified


def test_stale_longer_part_restarts(server, spleen_tar, tmp_path):
    server.state.files["/a.tar"] = spleen_tar
    (tmp_path / "a.tar.part").write_bytes(spleen_tar + b"stale tail")  # the file changed on the server
    dest = download_file(url_of(server, "/a.tar"), tmp_path / "a.tar", md5=_md5(spleen_tar), progress=False)
    assert dest.read_bytes() == spleen_tar
    assert [r["range"] for r in server.state.requests] == [f"bytes={len(spleen_tar) + 10}-", None]


def test_corrupted_download_rejected(server, spleen_tar, tmp_path):
    server.state.files["/a.tar"] = spleen_tar
    dest = tmp_path / "a.tar"
    with pytest.raises(DownloadError) as exc:
        download_file(url_of(server, "/a.tar"), dest, md5="0" * 32, progress=False)
    assert_one_line(str(exc.value), "corrupt", "md5", url_of(server, "/a.tar"))
    assert not dest.exists()
    assert not (tmp_path / "a.tar.part").exists()
    with pytest.raises(DownloadError) as exc:
        download_file(url_of(server, "/a.tar"), dest, expected_size=len(spleen_tar) + 1, progress=False)
    assert_one_line(str(exc.value), "corrupt", "size")
    assert list(tmp_path.iterdir()) == []


def test_existing_verified_file_makes_no_request(server, spleen_tar, tmp_path):
    dest = tmp_path / "a.tar"
    dest.write_bytes(spleen_tar)
    assert download_file(url_of(server, "/a.tar"), dest, md5=_md5(spleen_tar), progress=False) == dest
    assert server.state.requests == []


def test_http_error_is_one_line(server, tmp_path):
    with pytest.raises(DownloadError) as exc:
        download_file(url_of(server, "/missing.tar"), tmp_path / "m.tar", progress=False)
    assert_one_line(str(exc.value), "HTTP 404")


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:9/Task09_Spleen.tar", "refused"),  # closed port
    ("http://no-such-host.invalid/Task09_Spleen.tar", "cannot resolve host"),  # .invalid never resolves
])
def test_offline_fails_fast_with_one_line(tmp_path, capsys, url, reason):
    t0 = time.monotonic()
    rc = cli.main(["--out", str(tmp_path / "ct_data"), "--url", url, "--no-progress"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 1
    assert elapsed < 5.0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert_one_line(lines[0], "error: download of", url, reason, "--from DIR")
    assert not list((tmp_path / "ct_data").rglob("*.part"))


# ---- extraction -------------------------------------------------------------------------------
def test_path_traversal_in_archive_is_refused(tmp_path, crops):
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        _add(tar, "Task09_Spleen/imagesTr/../../../evil.nii.gz", _nifti_bytes(crops["spleen_2"]))
    with pytest.raises(DownloadError) as exc:
        extract_spleen(tar_path, tmp_path / "out")
    assert_one_line(str(exc.value), "unsafe path")
    assert not list(tmp_path.rglob("evil.nii.gz"))


def test_symlink_members_are_not_extracted(tmp_path, crops):
    tar_path = tmp_path / "links.tar"
    with tarfile.open(tar_path, "w") as tar:
        _add(tar, "Task09_Spleen/imagesTr/spleen_2.nii.gz", _nifti_bytes(crops["spleen_2"]))
        link = tarfile.TarInfo("Task09_Spleen/imagesTr/spleen_9.nii.gz")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    result = extract_spleen(tar_path, tmp_path / "out")
    assert [p.name for p in result.written] == ["spleen_2.nii.gz"]


def test_learn2reg_pairs_via_cli(server, crops, tmp_path, monkeypatch, capsys):
    buf = io.BytesIO()
    scan = _nifti_bytes(crops["spleen_2"])
    with zipfile.ZipFile(buf, "w") as zf:
        for case in ("case_001", "case_002", "case_010"):
            zf.writestr(f"training/scans/{case}_exp.nii.gz", scan)
            zf.writestr(f"training/scans/{case}_insp.nii.gz", scan)
            zf.writestr(f"training/lungMasks/{case}_exp.nii.gz", scan)
        zf.writestr("training/scans/case_003_exp.nii.gz", scan)  # incomplete pair: skipped
        zf.writestr("__MACOSX/training/scans/._case_001_exp.nii.gz", b"junk")
    data = buf.getvalue()
    server.state.files["/training.zip"] = data
    monkeypatch.setitem(download.SOURCES, "learn2reg",
                        dataclasses.replace(download.LEARN2REG, url=url_of(server, "/training.zip"), size=len(data)))
    out = tmp_path / "ct_data"
    assert cli.main(["--out", str(out), "--dataset", "learn2reg", "--max-samples", "2", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "learn2reg").iterdir()) == [
        "case_001_exp.nii.gz", "case_001_insp.nii.gz", "case_002_exp.nii.gz", "case_002_insp.nii.gz"]
    assert not list(out.glob("*.nii.gz"))  # pairs only under learn2reg/
    assert "checksum is not pinned" in capsys.readouterr().err


# ---- --from import ----------------------------------------------------------------------------
def test_import_nifti_and_dicom(tmp_path, crops, capsys):
    src = tmp_path / "my_scans"
    src.mkdir()
    nifti = src / "patient_a.nii.gz"
    nib.save(crops["spleen_2"], str(nifti))
    write_dicom_series(crops["spleen_3"], src / "nested" / "patient_b")
    write_dicom_series(crops["spleen_10"], tmp_path / "c")
    shutil.make_archive(str(src / "patient_c"), "zip", tmp_path / "c")
    (src / "notes.txt").write_text("not a scan", encoding="utf-8")
    labels = np.zeros(crops["spleen_2"].shape, np.uint8)
    labels[5:10, 5:10, 3:6] = 1
    nib.save(nib.Nifti1Image(labels, crops["spleen_2"].affine), str(src / "patient_a_seg.nii.gz"))
    out = tmp_path / "ct_data"
    assert cli.main(["--from", str(src), "--out", str(out)]) == 0
    assert (out / "patient_a.nii.gz").read_bytes() == nifti.read_bytes()  # copied as is
    assert (out / "patient_a_seg.nii.gz").is_file()  # label map beside it: copied, no "not CT" warning
    assert "warning" not in capsys.readouterr().err
    nested = nib.load(str(out / "nested__patient_b.nii.gz"))
    assert nib.aff2axcodes(nested.affine) == ("L", "A", "S")  # the official tool's dicom2nifti grid
    zipped = nib.load(str(out / "patient_c.nii.gz"))  # the same kind of series, zipped
    for got, ref in [(nested, crops["spleen_3"]), (zipped, crops["spleen_10"])]:
        got, ref = nib.as_closest_canonical(got), nib.as_closest_canonical(ref)
        assert got.shape == ref.shape
        assert np.allclose(got.affine, ref.affine, atol=1e-3)
        assert np.array_equal(np.asanyarray(got.dataobj), np.asanyarray(ref.dataobj))
    assert leftover_temp_files(out) == []
    assert not (out / "downloads").exists()  # --from alone downloads nothing

    # re-run keeps existing outputs; --force rewrites them
    mtime = (out / "nested__patient_b.nii.gz").stat().st_mtime_ns
    assert cli.main(["--from", str(src), "--out", str(out)]) == 0
    assert (out / "nested__patient_b.nii.gz").stat().st_mtime_ns == mtime
    assert cli.main(["--from", str(src), "--out", str(out), "--force"]) == 0
    assert (out / "nested__patient_b.nii.gz").stat().st_mtime_ns != mtime


def test_import_reports_bad_files_in_one_line(tmp_path, crops, capsys):
    src = tmp_path / "my_scans"
    src.mkdir()
    nib.save(crops["spleen_2"], str(src / "good.nii.gz"))
    (src / "broken.nii.gz").write_text("not gzip\n", encoding="utf-8")
    out = tmp_path / "ct_data"
    assert cli.main(["--from", str(src), "--out", str(out)]) == 1
    assert (out / "good.nii.gz").is_file() and not (out / "broken.nii.gz").exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1
    assert_one_line(err[0], "error:", str(src / "broken.nii.gz"), "not a readable NIfTI")


def test_import_missing_folder(tmp_path, capsys):
    assert cli.main(["--from", str(tmp_path / "nope"), "--out", str(tmp_path / "ct")]) == 1
    assert_one_line(capsys.readouterr().err, "folder not found")


# ---- --realistic ------------------------------------------------------------------------------
def test_realistic_variants(tmp_path, crops, capsys):
    out = tmp_path / "ct_data"
    out.mkdir()
    nib.save(crops["spleen_2"], str(out / "spleen_2.nii.gz"))
    nib.save(nib.Nifti1Image(np.eye(30, dtype=np.uint8)[:, :, None].repeat(15, 2), crops["spleen_2"].affine),
             str(out / "spleen_2_seg.nii.gz"))
    assert cli.main(["--out", str(out), "--realistic"]) == 0
    assert sorted(p.name for p in (out / "realistic").iterdir()) == ["spleen_2_realistic.nii.gz"]  # label maps skipped
    target = out / "realistic" / "spleen_2_realistic.nii.gz"
    img = nib.load(str(target))
    assert img.get_data_dtype() == np.int16
    assert np.allclose(img.header.get_zooms(), (0.8, 0.8, 1.5), atol=1e-5)
    assert img.shape == (112, 112, 30)
    assert not (out / "downloads").exists()
    mtime = target.stat().st_mtime_ns
    assert cli.main(["--out", str(out), "--realistic"]) == 0
    assert target.stat().st_mtime_ns == mtime  # never overwritten without --force
    assert "kept existing" in capsys.readouterr().out
