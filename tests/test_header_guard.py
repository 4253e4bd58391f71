"""A NIfTI header that declares more voxel data than its file holds is refused before anything is allocated.

Without the guard (common.imaging.nifti_guard.check_declared_size) a 2 KiB .nii claiming 2000x2000x2000 int16 voxels made
nibabel allocate 15 GiB (~40 s) before it noticed the file was short. Each lying file is loaded by the suite's
real loaders in a child process (under an address-space limit, so that a regression fails instead of eating
the machine's memory); the child reports its own load time and peak RSS (VmHWM).
"""
from __future__ import annotations

import gzip
import json
import resource
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.core.errors import InputError
from common.imaging.nifti_guard import check_declared_size
from common.imaging.volume import load_volume
from common.records.passport import build_passport, save_passport, scan_metadata

ROOT = Path(__file__).resolve().parents[1]
MAX_LOAD_S = 1.0
MAX_PEAK_RSS_MB = 200.0
CHILD_ADDRESS_SPACE = 3 * 1024**3  # a child that tried to allocate the declared gigabytes hits this instead
SCRIPT_TIMEOUT_S = 60

# The suite's loaders, each as called by its scripts: 03-06/registration (load_scan), 07's label maps
# (mask_io.load_label_map), 08/09's display scans (plots_passport.load_display_scan).
LOADERS = {
    "load_scan": "from common.imaging.validation import load_scan as load",
    "load_label_map": "from common.imaging.mask_io import load_label_map as load",
    "load_display_scan": "from common.reporting.plots_passport import load_display_scan as load",
}

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
{import_line}
from common.core.errors import InputError

def vm_hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

before = vm_hwm_mb()
t0 = time.perf_counter()
try:
    load(Path(sys.argv[1]))
    outcome, message = "loaded", ""
except InputError as exc:
    outcome, message = "InputError", str(exc)
except BaseException as exc:  # MemoryError, nibabel's own errors...: the guard did not catch it
    outcome, message = type(exc).__name__, str(exc)[:300]
load_s = time.perf_counter() - t0
print(json.dumps({{"outcome": outcome, "message": message, "load_s": load_s,
                  "peak_rss_mb_before": before, "peak_rss_mb": vm_hwm_mb()}}))
"""


def run_loader(loader: str, path: Path) -> dict:
    """Load ``path`` with ``loader`` in a fresh python; return what the child measured."""
    code = CHILD.format(limit=CHILD_ADDRESS_SPACE, import_line=LOADERS[loader])
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=SCRIPT_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{loader} {path.name}: {result['outcome']} in {result['load_s'] * 1000:.1f} ms, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB ({result['peak_rss_mb_before']:.0f} MB before loading)")
    return result


# ---- files, built at test time -----------------------------------------------------------------------
def _lying_bytes(shape: tuple[int, ...], data: bytes) -> bytes:
    """A valid NIfTI-1 single file (int16, 1 mm, vox_offset 352) whose header claims ``shape`` but holds ``data``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(shape)
    hdr.set_zooms((1.0, 1.0, 1.0))
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_qform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0\0\0\0" + data


@pytest.fixture(scope="module")
def files(tmp_path_factory, example_ct_sm, example_seg) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lying")
    rng = np.random.default_rng(0)
    huge = (2000, 2000, 2000)  # 16 GB of int16 declared
    few_kb = rng.integers(-1000, 1000, 2048, dtype=np.int16).tobytes()  # 4 KiB of data
    out = {
        "huge.nii": d / "huge.nii",
        "huge.nii.gz": d / "huge.nii.gz",
        "short_stream.nii.gz": d / "short_stream.nii.gz",
    }
    out["huge.nii"].write_bytes(_lying_bytes(huge, few_kb))
    out["huge.nii.gz"].write_bytes(gzip.compress(_lying_bytes(huge, few_kb)))
    # A plausible header (512^3 int16 = 256 MiB) over a complete, valid gzip stream of 2 MiB of incompressible
    # data: the file is large enough for the compression-ratio bound, only reading the stream shows it is short.
    out["short_stream.nii.gz"].write_bytes(
        gzip.compress(_lying_bytes((512, 512, 512), rng.integers(0, 256, 2 * 1024**2, dtype=np.uint8).tobytes())))
    ct = nib.load(str(example_ct_sm))
    seg = nib.load(str(example_seg))
    out["ct_crop.nii.gz"] = d / "ct_crop.nii.gz"
    out["seg_crop.nii.gz"] = d / "seg_crop.nii.gz"
    nib.save(ct.slicer[20:80, 20:80, 5:35], str(out["ct_crop.nii.gz"]))
    nib.save(seg.slicer[20:80, 20:80, 5:35], str(out["seg_crop.nii.gz"]))
    return out


LYING = ["huge.nii", "huge.nii.gz", "short_stream.nii.gz"]


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("name", LYING)
def test_lying_header_is_refused_fast_and_small(files, name, loader):
    path = files[name]
    assert path.stat().st_size < 3 * 1024**2  # a few bytes (or MiB) that claim 256 MiB to 15 GiB
    r = run_loader(loader, path)
    assert r["outcome"] == "InputError", r
    msg = r["message"]
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    assert "header declares" in msg and "truncated or corrupt file or header" in msg, msg
    assert r["load_s"] < MAX_LOAD_S, r
    assert r["peak_rss_mb"] < MAX_PEAK_RSS_MB, r


@pytest.mark.parametrize("loader, name", [("load_scan", "ct_crop.nii.gz"), ("load_display_scan", "ct_crop.nii.gz"),
                                          ("load_label_map", "seg_crop.nii.gz")])
def test_real_small_scan_still_loads(files, loader, name):
    r = run_loader(loader, files[name])
    assert r["outcome"] == "loaded", r


def test_messages_name_the_sizes(files):
    with pytest.raises(InputError) as exc:
        load_volume(files["huge.nii"])
    assert str(exc.value) == (f"{files['huge.nii']}: header declares 2000x2000x2000 int16 voxels (14.9 GiB) but the "
                              "file holds 4.0 KiB of data: truncated or corrupt file or header")
    with pytest.raises(InputError, match=r"compressed file can hold at most .* \(gzip ratio <= 1032:1\)"):
        load_volume(files["huge.nii.gz"])
    with pytest.raises(InputError, match=r"512x512x512 int16 voxels \(256.0 MiB\) but the compressed stream holds "
                                         r"2.0 MiB of data"):
        load_volume(files["short_stream.nii.gz"])


def test_declared_size_against_memory(files):
    path = files["ct_crop.nii.gz"]
    img = nib.load(str(path))
    n_bytes = int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    assert check_declared_size(path, img) == n_bytes
    assert check_declared_size(path, img, available=n_bytes) == n_bytes  # exactly enough: fine
    with pytest.raises(InputError) as exc:
        check_declared_size(path, img, available=n_bytes - 1)
    assert str(exc.value).startswith(f"{path}: header declares 60x60x") and "of memory" in str(exc.value)


def test_multi_member_gzip_is_verified_by_streaming(files, tmp_path):
    """A valid two-member gzip (ISIZE then covers only the last member) loads; cut short, it is refused."""
    raw = gzip.decompress(files["ct_crop.nii.gz"].read_bytes())
    good = tmp_path / "two_members.nii.gz"
    good.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    assert np.array_equal(np.asanyarray(load_volume(good).image.dataobj),
                          np.asanyarray(nib.load(str(files["ct_crop.nii.gz"])).dataobj))
    cut = tmp_path / "cut_members.nii.gz"
    cut.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:-1000]))
    with pytest.raises(InputError, match="compressed stream holds"):
        load_volume(cut)


# ---- the scripts, through their real command lines ---------------------------------------------------------
def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


def run_script(*args: str) -> subprocess.CompletedProcess:
    """Run a numbered script with its command line (address space limited as for the loaders)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=SCRIPT_TIMEOUT_S, preexec_fn=_limit_address_space)


@pytest.fixture(scope="module")
def spine_passport(files, tmp_path_factory) -> Path:
    """A passport with one vertebra (so 09 gets as far as loading the scan), recorded on the good crop."""
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:9, 3:9, 3:9] = 1
    img = nib.load(str(files["ct_crop.nii.gz"]))
    passport = build_passport(labels, np.eye(4), {1: "vertebrae_L1"}, scan=scan_metadata(files["ct_crop.nii.gz"], img),
                              model={"name": "test"}, resolution="original", max_points=10)
    return save_passport(passport, tmp_path_factory.mktemp("passport") / "p.json")


@pytest.mark.parametrize("script", ["08_visualize_passport.py", "09_visualize_spine.py"])
@pytest.mark.parametrize("name", ["huge.nii", "short_stream.nii.gz"])
def test_visualisation_scripts_refuse_a_lying_scan(files, spine_passport, tmp_path, script, name):
    done = run_script(script, "--passport", str(spine_passport), "--scan", str(files[name]),
                      "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {files[name]}: header declares"), done.stderr
    assert not (tmp_path / "x.png").exists()


def test_compare_records_a_lying_mask_and_goes_on(files, tmp_path):
    """07 reports a bad mask as that pair's problem (its documented design: one bad mask never stops the
    report); the lying mask must be refused by the guard, quickly, without a traceback."""
    from common.records.results import add_repeat, finalize_scan, new_result, new_scan_record, summarize, write_result

    results = []
    for name, method, mask in (("03_vanilla", "official_pytorch", files["seg_crop.nii.gz"]),
                               ("05_optimized", "optimized", files["huge.nii.gz"])):
        res = new_result(f"{name}.py", method=method, settings={}, model={"name": "test", "weights": "standin", "sha256": None})
        rec = new_scan_record("ct_data/scan_a.nii.gz", shape=(60, 60, 30), spacing_mm=(1.5, 1.5, 1.5),
                              orientation="RAS")
        add_repeat(rec, 1.0, {"load": 0.1, "inference": 0.8, "save": 0.1})
        finalize_scan(rec)
        rec["mask"] = str(mask)
        res["scans"].append(rec)
        summarize(res)
        results.append(str(write_result(res, tmp_path / f"{name}.json")))
    out = tmp_path / "out"
    done = run_script("07_compare_vanilla_vs_optimized.py", "--results", *results, "--out-dir", str(out))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    doc = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    row = next(r for r in doc["rows"] if r["method"] == "optimized")
    err = row["pair_error"]
    assert err.startswith(f"{files['huge.nii.gz']}: header declares 2000x2000x2000") and "\n" not in err, err
    assert any(str(files["huge.nii.gz"]) in note for note in doc["notes"])
