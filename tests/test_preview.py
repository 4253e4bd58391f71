"""The preview's views on the official segmentation of the shared real CT (real anatomy): radiological
orientation, distinct colours, and a PNG that shows the labels."""
from __future__ import annotations

import nibabel as nib
import numpy as np

from common.reporting.preview import label_colours, preview_panels, write_preview

LIVER, SPLEEN = 5, 1  # TotalSegmentator total task ids; vertebrae are 26..50


def _centroid(lab: np.ndarray, k: int) -> np.ndarray:
    """(row, column) centre of label ``k`` in a 2-D panel."""
    return np.argwhere(lab == k).mean(axis=0)


def _load(example_ct_sm, example_seg_fast) -> tuple[np.ndarray, np.ndarray]:
    ct = nib.as_closest_canonical(nib.load(example_ct_sm))
    seg = nib.as_closest_canonical(nib.load(example_seg_fast))
    return np.asanyarray(ct.dataobj), np.asanyarray(seg.dataobj)


def test_views_are_radiological(example_ct_sm, example_seg_fast):
    ct, seg = _load(example_ct_sm, example_seg_fast)
    panels = {name: lab for name, _, lab in preview_panels(ct, seg)}
    axial = panels["axial"]
    assert (axial == LIVER).any() and (axial == SPLEEN).any()
    liver, spleen = _centroid(axial, LIVER), _centroid(axial, SPLEEN)
    assert liver[1] < axial.shape[1] / 2 < spleen[1]  # the patient's right (liver) on the image's left
    vertebra = np.argwhere((axial >= 26) & (axial <= 50)).mean(axis=0)  # vertebrae ids: posterior
    assert vertebra[0] < liver[0]  # with origin="lower", posterior rows are low: anterior is up
    sag = panels["sagittal"]
    ids = np.unique(sag[sag > 0])
    assert ids.size >= 2


def test_neighbouring_ids_get_distinct_bright_colours():
    rgba = label_colours(np.arange(0, 118))
    assert rgba[0, 3] == 0 and np.all(rgba[1:, 3] > 0)
    rgb = rgba[1:, :3]
    assert np.all(rgb.max(axis=1) > 0.9)  # bright: never a near-black or a grey on CT
    assert np.all(rgb.max(axis=1) - rgb.min(axis=1) > 0.8)  # saturated
    assert np.all(np.abs(np.diff(rgb, axis=0)).sum(axis=1) > 0.3)  # consecutive ids differ visibly


def test_the_png_shows_the_labels(example_ct_sm, example_seg_fast, tmp_path):
    import matplotlib.image as mpimg

    ct, seg = _load(example_ct_sm, example_seg_fast)
    write_preview(ct, seg, tmp_path / "p.png", title="x")
    with_labels = mpimg.imread(tmp_path / "p.png")[..., :3]
    write_preview(ct, np.zeros_like(seg), tmp_path / "none.png", title="x")
    without = mpimg.imread(tmp_path / "none.png")[..., :3]
    coloured = lambda png: (png.max(axis=-1) - png.min(axis=-1)) > 0.15  # noqa: E731
    assert coloured(without).sum() == 0
    assert coloured(with_labels).sum() > 0.1 * with_labels.shape[0] * with_labels.shape[1] / 3
