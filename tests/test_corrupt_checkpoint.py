"""Issue 24, item 9: an unusable official checkpoint in $TOTALSEG_HOME_DIR (truncated, corrupt, or the weights of
another network) ends with ONE line on stderr that names the file and says what to do (delete the Dataset297
folder and download again, or use the stand-in), a non-zero exit code and no traceback; a cached ONNX export of
an older good checkpoint of the same folder is never run instead.

The official folder is made at test time in a temporary user home: the stand-in's plans and dataset (the
fixtures' models/totalseg_home) without its marker, i.e. what TotalSegmentator's downloader unpacks, with a
checkpoint damaged here. Scripts run as users run them: subprocesses, TOTALSEG_HOME_DIR, --weights official.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from common.core.errors import InputError
from common.inference.model import CHECKPOINT_NAME, STANDIN_MARKER, ModelSpec, load_model_spec
from common.inference.weights import DATASET_NAME, standin_folder, task297_folder

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _install_official(user_home: Path, checkpoint: bytes | None = None) -> Path:
    """The stand-in's folder copied to where TotalSegmentator keeps the official weights, without the marker;
    ``checkpoint``: the bytes of fold_0/checkpoint_final.pth (default: the stand-in's, whole)."""
    src = standin_folder()
    dst = user_home / "nnunet" / "results" / src.relative_to(src.parents[1])
    assert dst == task297_folder()
    (dst / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy2(src / name, dst / name)
    ckpt = src / "fold_0" / CHECKPOINT_NAME
    if checkpoint is None:
        shutil.copy2(ckpt, dst / "fold_0" / CHECKPOINT_NAME)
    else:
        (dst / "fold_0" / CHECKPOINT_NAME).write_bytes(checkpoint)
    assert not (dst / STANDIN_MARKER).exists()
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _scan(tmp_path: Path, example_ct_sm: Path) -> Path:
    nib.save(nib.load(str(example_ct_sm)).slicer[30:90, 25:80, :], tmp_path / "ct.nii.gz")
    return tmp_path / "ct.nii.gz"


def _env(user_home: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(user_home.parent), "TOTALSEG_HOME_DIR": str(user_home)}


def _one_line(proc: subprocess.CompletedProcess, ckpt: Path) -> str:
    """The single stderr line of a run refused for ``ckpt``: names it, the folder to delete and the fix."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"{ckpt}: ") and "truncated or corrupt" in line, line
    assert f"delete the folder {ckpt.parents[2]} " in line and ckpt.parents[2].name == DATASET_NAME, line
    assert "download the weights again" in line and "totalseg_download_weights -t total_fast" in line, line
    assert "--weights standin" in line and "miniz" not in line, line
    return line


def test_totalseg_fast_names_a_truncated_checkpoint_and_never_runs_the_cached_onnx(
        user_home, standin_home, tmp_path, example_ct_sm):
    from common.inference import model_cache
    from common.inference.run_config import RunConfig, save_config

    folder = _install_official(user_home)
    good = load_model_spec(folder)
    # an ONNX export of the good checkpoint, cached as ensure_onnx keeps it (the file itself a dummy): used as is
    cfg = RunConfig.fastest_exact_onnx()
    onnx = model_cache.onnx_variant_path(tmp_path / "cache" / "task297.onnx", cfg.onnx_norm == "precise")
    onnx.parent.mkdir()
    onnx.write_bytes(b"a cached export of the good checkpoint")
    onnx.with_suffix(".json").write_text(json.dumps({"model": good.provenance(), "instance_norm": cfg.onnx_norm}),
                                         encoding="utf-8")
    assert model_cache.ensure_onnx(good, tmp_path / "cache" / "task297.onnx",
                                   precise_norm=cfg.onnx_norm == "precise") == onnx
    # then the checkpoint gets truncated (a download or copy that stopped half-way)
    _truncate(good.checkpoint_path)
    config = save_config(cfg, tmp_path / "ort.json")
    exe = Path(sys.executable).parent / "totalseg-fast"
    proc = subprocess.run([str(exe), "-i", str(_scan(tmp_path, example_ct_sm)), "-o", str(tmp_path / "out"),
                           "--weights", "official", "--config", str(config),
                           "--onnx", str(onnx.parent / "task297.onnx")],
                          cwd=tmp_path, env=_env(user_home), capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=TIMEOUT_S)
    _one_line(proc, good.checkpoint_path)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.nii.gz"))


def test_06_names_a_truncated_checkpoint(user_home, standin_home, tmp_path, example_ct_sm):
    folder = _install_official(user_home)
    _truncate(folder / "fold_0" / CHECKPOINT_NAME)
    proc = subprocess.run([sys.executable, str(ROOT / "06_inferenceAndPassport.py"), "--input",
                           str(_scan(tmp_path, example_ct_sm)), "--out", str(tmp_path / "m06"), "--result",
                           str(tmp_path / "06.json"), "--weights", "official", "--no-passport"],
                          cwd=ROOT, env=_env(user_home), capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=TIMEOUT_S)
    _one_line(proc, folder / "fold_0" / CHECKPOINT_NAME)


def test_a_damaged_record_is_found_by_its_crc_and_the_onnx_cache_keys_on_the_sha256(user_home, standin_home,
                                                                                     tmp_path, monkeypatch):
    """torch.load does not notice a damaged tensor (it reads stored records without their CRC): the zip's
    CRC-32 check does. And ensure_onnx keys on the checkpoint's sha256: other bytes are exported again (here a
    sentinel), never served the export of the good file."""
    import zipfile

    import torch

    from common.inference import model_cache, onnx_export

    folder = _install_official(user_home)
    good = load_model_spec(folder)
    ckpt = good.checkpoint_path
    with zipfile.ZipFile(ckpt) as zf:
        big = max(zf.infolist(), key=lambda info: info.file_size)
    offset = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra) + 1000  # inside its data
    cached = tmp_path / "task297.onnx"
    cached.write_bytes(b"export of the good checkpoint")
    cached.with_suffix(".json").write_text(json.dumps({"model": good.provenance(), "instance_norm": "precise"}),
                                           encoding="utf-8")
    raw = bytearray(ckpt.read_bytes())
    raw[offset:offset + 16] = bytes(b ^ 0xFF for b in raw[offset:offset + 16])
    ckpt.write_bytes(bytes(raw))
    torch.load(ckpt, map_location="cpu", weights_only=False)  # torch itself: no complaint
    with pytest.raises(InputError) as err:
        load_model_spec(folder)
    msg = str(err.value)
    assert msg.startswith(f"{ckpt}: ") and "CRC" in msg and f"delete the folder {folder.parent} " in msg
    assert "\n" not in msg

    def sentinel(*args, **kwargs):
        raise AssertionError("re-export requested")

    monkeypatch.setattr(onnx_export, "export_and_check", sentinel)
    damaged = ModelSpec(folder=good.folder, fold=good.fold, configuration=good.configuration, plans=good.plans,
                        dataset=good.dataset)  # as if loaded before the check existed
    assert damaged.checkpoint_sha256 != good.checkpoint_sha256
    with pytest.raises(AssertionError, match="re-export requested"):
        model_cache.ensure_onnx(damaged, cached, log=lambda _: None)


def test_weights_of_another_network_or_no_nnunet_checkpoint_are_one_line(user_home, standin_home, tmp_path):
    import torch

    folder = _install_official(user_home)
    ckpt = folder / "fold_0" / CHECKPOINT_NAME
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    weights = state["network_weights"]
    head = next(k for k in weights if k.startswith("decoder.seg_layers") and k.endswith("weight"))
    weights[head] = weights[head][:105]  # a head with another number of classes (e.g. another task)
    dropped = next(iter(weights))
    del weights[dropped]
    torch.save(state, ckpt)
    spec = load_model_spec(folder)  # a sound file: only building the network finds out
    with pytest.raises(InputError) as err:
        spec.build_network()
    msg = str(err.value)
    assert msg.startswith(f"{ckpt}: ") and "another network" in msg and str(folder / "plans.json") in msg
    assert "1 missing" in msg and "1 of another shape" in msg and head in msg and "(105," in msg
    assert f"delete the folder {folder.parent} " in msg and "\n" not in msg
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(InputError, match="not an nnU-Net checkpoint") as err:
        load_model_spec(folder).build_network()
    assert "\n" not in str(err.value)


def test_a_damaged_stand_in_says_it_is_rebuilt(tmp_path, standin_home):
    folder = tmp_path / "standin"
    shutil.copytree(standin_folder(), folder)
    _truncate(folder / "fold_0" / CHECKPOINT_NAME)
    with pytest.raises(InputError) as err:
        load_model_spec(folder)
    assert f"delete the folder {folder} and run again (the stand-in weights are rebuilt)" in str(err.value)
    (folder / "fold_0" / CHECKPOINT_NAME).write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_model_spec(folder)
