"""The pieces under the clinical app, without a page: a user's segmentation read onto the scan's grid (label map,
folder of masks, zip of one; bad ones refused in one line), the per-structure figures against the official
statistics' rules, and the planes' orientation on screen."""
from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pytest

from common.core.errors import InputError
from common.imaging.segmentation_input import load_segmentation
from common.imaging.validation import load_scan

CLASSES = {"liver": 5, "spleen": 1, "aorta": 52}  # TotalSegmentator's total task ids


@pytest.fixture(scope="module")
def scan(example_ct_sm):
    return load_scan(example_ct_sm)[0]


@pytest.fixture(scope="module")
def labels(example_seg_fast) -> np.ndarray:
    return np.asanyarray(nib.load(example_seg_fast).dataobj)


def _masks(folder, labels, affine, classes=CLASSES):
    folder.mkdir()
    for name, k in classes.items():
        nib.save(nib.Nifti1Image((labels == k).astype(np.uint8), affine), folder / f"{name}.nii.gz")
    return folder


def test_a_label_map_keeps_its_ids_and_takes_the_total_names(scan, labels, example_seg_fast):
    seg = load_segmentation(example_seg_fast, scan)
    assert np.array_equal(seg.labels, labels) and seg.kind == "label map" and seg.note is None
    assert seg.names[5] == "liver" and seg.describe() == "your label map example_seg_fast.nii.gz (40 structures)"


def test_a_folder_of_masks_and_a_zip_of_it_give_the_same_label_map(scan, labels, tmp_path):
    folder = _masks(tmp_path / "masks", labels, scan.affine)
    archive = tmp_path / "masks.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"segs/{f.name}")
    expected = np.where(np.isin(labels, list(CLASSES.values())), labels, 0)
    for given in (folder, archive):
        seg = load_segmentation(given, scan)
        assert seg.kind == "masks" and np.array_equal(seg.labels, expected)
        assert {seg.names[k] for k in CLASSES.values()} == set(CLASSES)


def test_a_reoriented_label_map_is_put_on_the_scans_grid(scan, labels, tmp_path):
    img = nib.Nifti1Image(labels, scan.affine)
    flipped = img.as_reoriented(nib.orientations.axcodes2ornt(("L", "P", "S")))  # RAS -> LPS: same voxels
    nib.save(flipped, tmp_path / "lps.nii.gz")
    seg = load_segmentation(tmp_path / "lps.nii.gz", scan)
    assert np.array_equal(seg.labels, labels) and seg.note == "reoriented LPS -> RAS onto the scan's grid"


@pytest.mark.parametrize("case", ["scan as labels", "scan without intercept", "other grid", "not binary", "not a file"])
def test_a_bad_segmentation_is_one_line_naming_the_file(scan, labels, tmp_path, example_ct_sm, case):
    if case == "scan as labels":
        path, words = example_ct_sm, "negative labels"
    elif case == "scan without intercept":  # all values >= 0, as a CT exported without its rescale intercept
        path, words = tmp_path / "raw.nii.gz", "not class ids"
        ct = np.asanyarray(scan.image.dataobj).astype(np.int32)
        nib.save(nib.Nifti1Image((ct - ct.min()).astype(np.int16), scan.affine), path)
    elif case == "other grid":
        path, words = tmp_path / "crop.nii.gz", "grid differs"
        nib.save(nib.Nifti1Image(labels[:-4], scan.affine), path)
    elif case == "not binary":
        folder = _masks(tmp_path / "masks", labels, scan.affine)
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), scan.affine), folder / "liver.nii.gz")
        path, words = folder, "not a binary mask"
    else:
        path, words = tmp_path / "report.txt", "not a segmentation"
        path.write_text("text", encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_segmentation(path, scan)
    assert words in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith(str(err.value.path))


def test_structure_figures_follow_the_official_rules(scan, labels):
    from totalsegmentator.statistics import touches_border

    from common.imaging.structure_stats import structure_figures

    ct = np.asanyarray(scan.image.dataobj)
    figures = structure_figures(labels, ct, scan.spacing, {5: "liver"})
    assert [f.label for f in figures] == [int(k) for k in np.unique(labels) if k != 0]
    for f in figures:
        mask = labels == f.label
        assert f.voxels == mask.sum() and f.volume_mm3 == pytest.approx(mask.sum() * 27.0)
        assert f.mean_hu == pytest.approx(ct[mask].mean()) and f.touches_border == touches_border(mask)
    assert figures[[f.label for f in figures].index(5)].name == "liver" and figures[0].name.startswith("label_")


def test_the_planes_are_radiological_and_in_proportion():
    from registration import app_views

    vol = np.zeros((20, 30, 10), np.int16)  # (x, y, z) RAS+: x grows to the patient's right, y anterior, z superior
    vol[19, 0, 9] = 1  # the most right, most posterior, most superior voxel
    ras, spacing = app_views.to_ras(vol, np.diag([1.0, 2.0, 3.0, 1.0]))
    assert spacing == (1.0, 2.0, 3.0)
    axial = app_views.plane_slice(ras, "axial", 9)
    assert axial.shape == (30, 20) and axial[29, 0] == 1  # posterior at the bottom, the patient's right on the left
    coronal = app_views.plane_slice(ras, "coronal", 0)
    assert coronal.shape == (10, 20) and coronal[0, 0] == 1  # superior at the top
    sagittal = app_views.plane_slice(ras, "sagittal", 19)
    assert sagittal.shape == (10, 30) and sagittal[0, 29] == 1  # anterior on the left, so posterior on the right
    shown = app_views.to_display(app_views.grey(coronal), app_views.pixel_mm(spacing, "coronal"), 300)
    assert shown.shape[:2] == (300, 200)  # 10 x 3 mm tall, 20 x 1 mm wide
