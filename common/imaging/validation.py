"""Input checks shared by every script that reads a scan (03-07, registration).

Errors are ``common.core.errors.InputError`` (one line: '<path>: <problem>'); warnings and notes are
returned as one-line strings that start with the path. Arrays are nibabel-ordered (x, y, z);
affines map voxel indices to world mm (RAS+). Sizes/spacings given as tuples are (x, y, z).

Choices made here:
- 4D data with a single volume (shape x, y, z, 1 - some exporters write that) is accepted and
  squeezed to 3D by ``load_scan`` (``validate_image`` notes it); more than one volume is an error.
- nibabel silently "fixes" some bad headers on load (negative pixdim -> abs, zero pixdim -> 1 mm).
  ``load_scan`` therefore also reads the raw header and rejects zero/negative/NaN voxel sizes
  there, since other readers (niftilib/ITK, TotalSegmentator's header-zoom resampling) disagree.
- "Not CT" is a warning, never an error: the pipeline can run, the output is just meaningless.
- No orientation and a sheared affine are warnings (common.imaging.header_checks says why).
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from common.core.errors import InputError
from common.core.machine import available_memory_bytes
from common.core.text import fmt_shape, fmt_vec
from common.imaging.header_checks import orientation_warning, shear_warning
from common.imaging.labels import GRID_ATOL_MM
from common.imaging.scan_paths import is_nifti_path
from common.imaging.volume import Volume, load_volume

AXES = "xyz"
MIN_VOXELS_PER_AXIS = 2
# CT heuristics (Hounsfield units), on robust percentiles: in CT well over 1 % of voxels are air
# (-1000), lung or fat (-100), even in a tight crop inside the body (verified on crops of the example
# CT: p1 = -108..-138), so the 1st percentile is below -50 HU; soft tissue and bone put the 99th
# percentile above 0. MR is (almost) non-negative with a ~0 background (example MR: p1 = -2), as is a
# CT exported without its rescale intercept (air = 0) or an intensity-normalised image.
CT_P1_MAX_HU = -50.0
CT_P99_MIN_HU = 0.0
STATS_SAMPLE_VOXELS = 2_000_000
SPACING_MISMATCH_RTOL = 1e-3
GIB = 1024**3
MODALITIES = ("CT", "MR", "ANY")


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def check_spacing(path: str | Path | None, img: nib.Nifti1Image) -> list[str]:
    """Header voxel sizes and affine must give 3 positive finite spacings and a non-singular affine.

    Raises InputError for zero/negative/NaN/inf header zooms or affine column norms, and for a
    singular (degenerate) affine. Returns a warning when header zooms and affine disagree.
    """
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    for axis, z in zip(AXES, zooms, strict=False):
        if not math.isfinite(z):
            raise InputError(path, f"voxel size in the header (pixdim) is {z} along {axis}; fix the file's header")
        if z <= 0:
            kind = "zero" if z == 0 else f"negative ({z:g} mm)"
            raise InputError(path, f"voxel size in the header (pixdim) is {kind} along {axis}; fix the file's header")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine (voxel-to-world matrix) contains NaN or inf; fix the file's sform/qform")
    rzs = affine[:3, :3]
    norms = np.linalg.norm(rzs, axis=0)
    for axis, n in zip(AXES, norms, strict=True):
        if n <= 1e-6:
            raise InputError(path, f"affine gives zero voxel size along {axis} (degenerate sform/qform); fix the header")
    # Singular / degenerate: columns (nearly) parallel. |det| / prod(norms) is 1 for orthogonal axes.
    if abs(np.linalg.det(rzs)) / float(np.prod(norms)) < 1e-3:
        raise InputError(path, f"affine is singular (voxel axes are parallel: {np.round(rzs, 4).tolist()}); "
                               "fix the file's sform/qform")
    warnings: list[str] = []
    if len(zooms) == 3 and not np.allclose(zooms, norms, rtol=SPACING_MISMATCH_RTOL, atol=1e-4):
        warnings.append(f"{path}: header voxel size {fmt_vec(zooms)} mm differs from the affine's "
                        f"{fmt_vec(norms)} mm; the affine is used")
    return warnings


def check_raw_header(path: str | Path) -> None:
    """Check the on-disk NIfTI header before nibabel's fixes: zero/negative/NaN pixdim -> InputError.

    nibabel replaces negative pixdim by its absolute value and zero by 1 mm when it loads a file;
    niftilib/ITK read the same file differently, so such a file is rejected here.
    """
    path = Path(path)
    if not is_nifti_path(path) or not path.is_file():
        return
    try:
        with ImageOpener(str(path)) as fobj:
            raw = fobj.read(540)
        nifti2 = len(raw) >= 4 and 540 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big"))
        hdr_class = nib.Nifti2Header if nifti2 else nib.Nifti1Header
        hdr = hdr_class.from_fileobj(io.BytesIO(raw), check=False)
        ndim = int(hdr["dim"][0])
        pixdim = np.asarray(hdr["pixdim"][1:1 + min(max(ndim, 0), 3)], dtype=np.float64)
    except Exception:  # unreadable headers are reported by load_volume with a better message
        return
    for axis, z in zip(AXES, pixdim, strict=False):
        if not math.isfinite(z):
            raise InputError(path, f"voxel size in the header (pixdim) is {z} along {axis}; fix the file's header")
        if z == 0:
            raise InputError(path, f"voxel size in the header (pixdim) is zero along {axis} "
                                   "(nibabel would silently use 1 mm); fix the file's header")
        if z < 0:
            raise InputError(path, f"voxel size in the header (pixdim) is negative along {axis} ({z:g} mm); "
                                   "readers disagree on its meaning (nibabel takes abs, niftilib uses 1 mm); "
                                   "fix the file's header")


def check_min_size(path: str | Path | None, shape: Sequence[int], spacing_mm: Sequence[float] | None = None, *,
                   target_spacing_mm: Sequence[float] | None = None,
                   patch_size_xyz: Sequence[int] | None = None) -> list[str]:
    """Fewer than MIN_VOXELS_PER_AXIS (2) voxels along x, y or z -> InputError.

    A scan smaller than one network patch is allowed (the pipeline pads it): when spacing,
    target spacing and the patch size (all (x, y, z)) are given, that case returns an
    informational note instead. Returns a list of notes (possibly empty).
    """
    shape3 = [int(s) for s in list(shape)[:3]]
    for axis, n in zip(AXES, shape3, strict=False):
        if n < MIN_VOXELS_PER_AXIS:
            raise InputError(path, f"scan has only {n} voxel(s) along {axis} (shape {fmt_shape(shape)}); "
                                   f"at least {MIN_VOXELS_PER_AXIS} are needed along every axis")
    notes: list[str] = []
    if spacing_mm is not None and target_spacing_mm is not None and patch_size_xyz is not None:
        model_shape = _model_shape(shape3, spacing_mm, target_spacing_mm)
        small = [a for a, m, p in zip(AXES, model_shape, patch_size_xyz, strict=True) if m < int(p)]
        if small:
            notes.append(f"{path}: scan is smaller than one model patch along {','.join(small)} "
                         f"({fmt_shape(model_shape)} voxels at {fmt_vec(target_spacing_mm)} mm vs patch "
                         f"{fmt_shape(patch_size_xyz)}); it will be padded (fine)")
    return notes


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _model_shape(shape: Sequence[int], spacing_mm: Sequence[float], target_spacing_mm: Sequence[float]) -> list[int]:
    return [max(1, int(round(int(n) * float(s) / float(t))))
            for n, s, t in zip(list(shape)[:3], spacing_mm, target_spacing_mm, strict=True)]


def estimate_memory_bytes(shape_xyz: Sequence[int], spacing_mm: Sequence[float], target_spacing_mm: Sequence[float],
                          n_classes: int, patch_size: Sequence[int]) -> int:
    """Peak-ish RAM (bytes) to segment a scan, all (x, y, z):

    float64 scan as loaded + float32 scan resampled to the model spacing (padded to at least one patch per
    axis) + the float16 logit sums of one row of tiles (n_classes x model x-y plane x patch z: the sliding
    window finalises slabs as it goes) + one tile's float32 logits + the network's working memory for one
    tile (2 KiB per patch voxel, measured: ACTIVATION_BYTES_PER_VOXEL) + two uint8 label maps at the original
    resolution (the resampled-back segmentation and the copy being written).
    ``patch_size`` is (x, y, z); the sliding window's first axis is z.
    """
    n_orig = int(np.prod([int(s) for s in list(shape_xyz)[:3]], dtype=np.int64))
    model = [max(m, int(p)) for m, p in zip(_model_shape(shape_xyz, spacing_mm, target_spacing_mm), patch_size,
                                            strict=True)]
    n_model = int(np.prod(model, dtype=np.int64))
    n_patch = int(np.prod([int(p) for p in patch_size], dtype=np.int64))
    n_window = model[0] * model[1] * int(patch_size[2])
    k = int(n_classes)
    return int(n_orig * 8 + n_model * 4 + k * n_window * 2 + k * n_patch * 4 + ACTIVATION_BYTES_PER_VOXEL * n_patch
               + 2 * n_orig * 1)


# The network's working memory per patch voxel, the largest of the backends: 06's default (PyTorch
# channels-last with glibc keeping freed memory, common.core.heap) peaked at 2.85 GiB for one 112x112x128 tile
# with the model loaded (python -m common.cli.profile_tile), 1.9 KB per voxel; ONNX Runtime with the memory
# pattern off 1.80 GiB, the same network with glibc's default malloc 1.66 GiB.
ACTIVATION_BYTES_PER_VOXEL = 2048


def check_memory(path: str | Path | None, estimate: int, available: int | None = None) -> None:
    """Raise InputError when ``estimate`` bytes exceed ``available`` (default: this machine's free RAM).

    Does nothing when the available memory cannot be determined.
    """
    if available is None:
        available = available_memory_bytes()
    if available is None or int(estimate) <= int(available):
        return
    raise InputError(path, f"needs ~{estimate / GIB:.1f} GiB of memory, {available / GIB:.1f} GiB available; "
                           "crop the scan or use a machine with more memory")


# ---------------------------------------------------------------------------------------------
# intensities
# ---------------------------------------------------------------------------------------------
def _slab_iter(data: np.ndarray, slab_voxels: int = 16_000_000):
    """Yield views of ``data`` in slabs along its last spatial axis (bounded temporaries)."""
    if data.ndim < 3 or data.size <= slab_voxels:
        yield data
        return
    per_slice = max(1, data.size // max(1, data.shape[2]))
    step = max(1, slab_voxels // per_slice)
    for k in range(0, data.shape[2], step):
        yield data[:, :, k:k + step]


def _check_values(path: str | Path | None, data: np.ndarray) -> tuple[float, float]:
    """Raise on NaN/inf voxels or an all-constant scan; return (min, max). One pass over the array."""
    lo, hi = math.inf, -math.inf
    is_float = np.issubdtype(data.dtype, np.inexact)
    for slab in _slab_iter(data):
        if is_float and not np.isfinite(slab).all():
            n_nan, n_inf = _count_nonfinite(data)
            what = " and ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} inf" if n_inf else "") if p)
            raise InputError(path, f"scan contains {what} voxel value(s); the image data are corrupt")
        if slab.size:
            lo = min(lo, float(slab.min()))
            hi = max(hi, float(slab.max()))
    if lo == hi:
        raise InputError(path, f"all voxels have the same value ({lo:g}); the scan is blank or empty")
    return lo, hi


def _count_nonfinite(data: np.ndarray) -> tuple[int, int]:
    n_nan = n_inf = 0
    for slab in _slab_iter(data):
        n_nan += int(np.isnan(slab).sum())
        n_inf += int(np.isinf(slab).sum())
    return n_nan, n_inf


def _sample(data: np.ndarray, n: int = STATS_SAMPLE_VOXELS) -> np.ndarray:
    """A strided subsample of about ``n`` voxels (no copy of the whole array)."""
    if data.size <= n:
        return np.asarray(data).reshape(-1)
    stride = max(1, int(round((data.size / n) ** (1.0 / data.ndim))))
    return np.asarray(data[tuple(slice(None, None, stride) for _ in range(data.ndim))]).reshape(-1)


def ct_intensity_warning(path: str | Path | None, data: np.ndarray) -> str | None:
    """One-line warning when the intensities do not look like CT in HU (e.g. an MR scan), else None."""
    sample = _sample(data).astype(np.float32, copy=False)
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
    if p1 <= CT_P1_MAX_HU and p99 >= CT_P99_MIN_HU:
        return None
    return (f"{path}: intensities do not look like CT in Hounsfield units (1st percentile {p1:.0f}, "
            f"99th percentile {p99:.0f}; CT has air/fat below -50 HU and tissue/bone above 0): is this an MR "
            "scan or a CT without its rescale intercept? The CT model's output will be meaningless")


# ---------------------------------------------------------------------------------------------
# whole image
# ---------------------------------------------------------------------------------------------
def validate_image(img: nib.Nifti1Image, path: str | Path | None, *, modality: str = "CT",
                   data: np.ndarray | None = None) -> list[str]:
    """Check a loaded scan; raise InputError (one line, names ``path``) or return one-line warnings.

    Errors: 2D data, 4D data with more than one volume (or >4D), fewer than 2 voxels along an
    axis, zero/negative/NaN/inf voxel size (header zooms or affine columns), a singular affine,
    NaN/inf voxels, an all-constant scan. Warnings: a single-volume 4D image (use it squeezed, as
    ``load_scan`` does), header zooms != affine spacing, no orientation (sform/qform codes 0) and a
    sheared affine (common.imaging.header_checks), and for modality "CT" intensities that
    do not look like CT (e.g. an MR scan); "MR" and "ANY" (e.g. label maps) skip that check.
    ``data`` is the voxel array if already in memory (otherwise read from ``img`` once); it is
    never copied whole.
    """
    modality = modality.upper()
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    warnings: list[str] = []
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise InputError(path, f"{len(shape)}D image (shape {fmt_shape(shape)}); a 3D volume is needed")
    if len(shape) > 3:
        extra = shape[3:]
        if any(s != 1 for s in extra):
            raise InputError(path, f"{len(shape)}D image with {int(np.prod(extra))} volumes (shape {fmt_shape(shape)});"
                                   " give a single 3D volume (split the series first)")
        warnings.append(f"{path}: {len(shape)}D image with a single volume (shape {fmt_shape(shape)}); "
                        "treated as 3D")
    check_min_size(path, shape[:3])
    spacing_warnings = check_spacing(path, img)  # raises first: the shear is measured on a valid affine
    shear = shear_warning(path, img)  # names a header/affine voxel size mismatch itself: one line, not two
    warnings += [shear] if shear else spacing_warnings
    orientation = orientation_warning(path, img)
    if orientation:
        warnings.append(orientation)

    if data is None:
        data = np.asanyarray(img.dataobj)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    _check_values(path, data)
    if modality == "CT":
        msg = ct_intensity_warning(path, data)
        if msg:
            warnings.append(msg)
    return warnings


def squeeze_to_3d(img: nib.Nifti1Image, data: np.ndarray | None = None) -> nib.Nifti1Image:
    """Return an in-memory image of ``data`` (default: read from ``img``) with trailing singleton dims dropped."""
    if data is None:
        data = np.asanyarray(img.dataobj)
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    return nib.Nifti1Image(data, np.asarray(img.affine), img.header)


def load_scan(path: str | Path, modality: str = "CT") -> tuple[Volume, list[str]]:
    """Load a NIfTI file, DICOM series folder or zip of one (common.imaging.dicom) and validate it; return (Volume, warnings).

    The voxel data are read exactly once here (a truncated or corrupt .nii.gz, which nibabel only
    notices when reading data, becomes an InputError); the returned Volume's image holds that
    array, squeezed to 3D for a single-volume 4D file. Raises InputError for every problem listed
    in ``validate_image``, for missing/unreadable files and, before any voxel is read, for a header
    that declares more data than the file holds or than fits in free memory (``load_volume``).
    """
    path = Path(path)
    check_raw_header(path)
    vol = load_volume(path)
    img = vol.image
    dtype = img.get_data_dtype()  # from the header: refuse RGB/complex before reading any voxel
    if dtype.names is not None or dtype.kind not in "biuf":
        what = "/".join(dtype.names) if dtype.names else str(dtype)
        raise InputError(path, f"voxels hold {what} values, not one grey value each (an RGB or complex image); "
                               "a grayscale scan is needed")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError (mmap too short), ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"truncated or corrupt image data ({type(exc).__name__}: {reason}); "
                               "re-download or re-export the file") from exc
    warnings = list(img.extra.get("warnings", [])) + validate_image(img, path, modality=modality, data=data)
    if data.ndim > 3 or data is not img.dataobj:
        img = squeeze_to_3d(img, data)
    return Volume(path, img), warnings


def scan_from_image(img: nib.Nifti1Image, label: str = "nibabel image") -> tuple[Volume, list[str]]:
    """A scan given in memory (e.g. to the python API) checked as ``load_scan`` checks a file; its Volume (path
    ``label``, for messages) and warnings. Raises InputError (one line) for every problem of validate_image."""
    if not isinstance(img, nib.Nifti1Image):
        img = nib.Nifti1Image.from_image(img)
    data = np.asanyarray(img.dataobj)
    warnings = validate_image(img, label, data=data)
    if data.ndim > 3:
        img = squeeze_to_3d(img, data)
    return Volume(Path(label), img), warnings


def check_label_map_matches(scan_img: nib.Nifti1Image, label_img: nib.Nifti1Image,
                            scan_path: str | Path | None, label_path: str | Path | None) -> None:
    """A label map must share its scan's voxel grid: same (x, y, z) shape and affine (common.imaging.labels.GRID_ATOL_MM).

    Raises InputError naming both files.
    """
    s_shape = tuple(int(s) for s in scan_img.shape[:3])
    l_shape = tuple(int(s) for s in label_img.shape[:3])
    l_extra = tuple(int(s) for s in label_img.shape[3:])
    if s_shape != l_shape or any(s != 1 for s in l_extra):
        raise InputError(label_path, f"label map shape {fmt_shape(label_img.shape)} does not match scan {scan_path} "
                                     f"shape {fmt_shape(scan_img.shape)}")
    s_aff = np.asarray(scan_img.affine, dtype=np.float64)
    l_aff = np.asarray(label_img.affine, dtype=np.float64)
    if not np.allclose(s_aff, l_aff, atol=GRID_ATOL_MM, rtol=0):
        diff = float(np.max(np.abs(s_aff - l_aff)))
        raise InputError(label_path, f"label map affine does not match scan {scan_path} (max difference {diff:.4g}; "
                                     f"orientation {''.join(nib.aff2axcodes(l_aff))} vs "
                                     f"{''.join(nib.aff2axcodes(s_aff))}); the files are not on the same voxel grid")
