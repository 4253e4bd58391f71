"""The .nii.gz writer (common.core.atomic.atomic_save_nifti): ISA-L's deflate writes the same standard file.

Compared with nibabel's own writer (nib.save, zlib) on a real CT and on label masks made from a real label
map: the decompressed bytes (header + voxels) are identical, every reader (nibabel, SimpleITK, Python's
gzip) reads it, and without python-isal the writer falls back to nib.save.
"""
from __future__ import annotations

import gzip
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from common.core import atomic
from common.core.atomic import atomic_save_nifti, leftover_temp_files


def _inflated(path) -> bytes:
    with gzip.open(path, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def real_images(example_ct_sm, example_seg_fast):
    ct = nib.load(example_ct_sm)
    seg = nib.load(example_seg_fast)
    labels = np.asanyarray(seg.dataobj)
    liver_like = (labels == np.unique(labels[labels > 0])[0]).astype(np.uint8)
    mask = nib.Nifti1Image(liver_like, seg.affine, seg.header)
    mask.set_data_dtype(np.uint8)
    return {"ct_int16": nib.Nifti1Image(np.asanyarray(ct.dataobj), ct.affine, ct.header),
            "label_map": nib.Nifti1Image(labels, seg.affine, seg.header), "mask_uint8": mask}


@pytest.mark.parametrize("name", ["ct_int16", "label_map", "mask_uint8"])
def test_isal_writes_the_bytes_nibabel_writes_and_every_reader_reads_them(tmp_path, real_images, name):
    pytest.importorskip("isal")  # pinned in requirements.txt; this test is about it
    img = real_images[name]
    ours, theirs = tmp_path / "ours.nii.gz", tmp_path / "nib.nii.gz"
    atomic_save_nifti(img, ours)
    nib.save(img, str(theirs))
    assert ours.read_bytes()[:2] == b"\x1f\x8b"  # a gzip member (RFC 1952)
    assert _inflated(ours) == _inflated(theirs)  # header and voxels byte for byte
    back = nib.load(ours)
    assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(img.dataobj))
    assert np.array_equal(back.affine, nib.load(theirs).affine)
    by_sitk = sitk.GetArrayFromImage(sitk.ReadImage(str(ours)))  # (z, y, x)
    assert np.array_equal(by_sitk.transpose(2, 1, 0), np.asanyarray(img.dataobj))
    assert leftover_temp_files(tmp_path) == []


def test_without_isal_the_writer_falls_back_to_nibabel(tmp_path, real_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import igzip` now raises ImportError
    assert atomic._save_nifti_gz_fast(real_images["mask_uint8"], tmp_path / "x.nii.gz") is False
    ours, theirs = tmp_path / "ours.nii.gz", tmp_path / "nib.nii.gz"
    atomic_save_nifti(real_images["mask_uint8"], ours)
    nib.save(real_images["mask_uint8"], str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()  # nibabel's own file, compressed bytes included


def test_uncompressed_and_two_file_images_still_go_through_nibabel(tmp_path, real_images):
    img = real_images["mask_uint8"]
    atomic_save_nifti(img, tmp_path / "plain.nii")
    nib.save(img, str(tmp_path / "ref.nii"))
    assert (tmp_path / "plain.nii").read_bytes() == (tmp_path / "ref.nii").read_bytes()
    pair = nib.Nifti1Pair(np.asanyarray(img.dataobj), img.affine)  # nib.save makes it one .nii.gz file
    atomic_save_nifti(pair, tmp_path / "pair.nii.gz")
    nib.save(pair, str(tmp_path / "ref_pair.nii.gz"))
    assert _inflated(tmp_path / "pair.nii.gz") == _inflated(tmp_path / "ref_pair.nii.gz")
    assert leftover_temp_files(tmp_path) == []
