"""Our segment() vs the official TotalSegmentator (python API, fast, CPU) on the same stand-in weights.

Real CT from ../shared plus two variants made here (reoriented to LPS and resampled to 1.5 mm; extended
along z to two rows of tiles). The official tool runs offline inside the test, once per case. Every backend
of segment() must agree >= 99.9 % with it and reach Dice >= 0.99 for every class with >= 100 voxels.
PyTorch-backed, the output is identical; backed by ONNX Runtime or by the channels-last oneDNN network
(06's default), the few voxels that differ must sit where the reference's top-2 logits are closer than that
backend's logit difference from PyTorch's (float arithmetic decides those; random weights produce many
near-ties). The near-tie maps replay the tile logits that segment() has just computed (_TileMemo) instead
of running each network a second time.
"""
from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from common.inference.pipeline import segment
from common.inference.run_config import SegmentOptions
from common.records.metrics import dice_per_class, voxel_agreement
from common.sources.variants import reorient, resample_variant

pytestmark = pytest.mark.slow


def _min_dice_over_big_classes(a: np.ndarray, b: np.ndarray, min_voxels: int = 100) -> tuple[float, dict]:
    counts_a = np.bincount(a.ravel(), minlength=256)
    counts_b = np.bincount(b.ravel(), minlength=256)
    big = [int(k) for k in range(1, 256) if max(counts_a[k], counts_b[k]) >= min_voxels]
    dice = dice_per_class(a, b, labels=big)
    return min(dice.values()), dice


@pytest.fixture(scope="module")
def cases(official_labels, example_ct_sm, example_ct, tmp_path_factory):
    """(name, image path, official labels) for the three parity cases; official runs happen once a session."""
    tmp = tmp_path_factory.mktemp("parity")
    lps = reorient(resample_variant(nib.load(example_ct_sm), (1.5, 1.5, 1.5), order=1), "LPS")
    lps_path = tmp / "example_ct_sm_lps_1.5mm.nii.gz"
    nib.save(lps, lps_path)
    # multi-tile: example_ct_sm extended along z by mirroring to 150 slices of 3 mm -> two rows of tiles along
    # nnU-Net's first axis, so the slab-wise argmax finalises a slab between rows
    sm = nib.load(example_ct_sm)
    tall = np.pad(np.asanyarray(sm.dataobj), ((0, 0), (0, 0), (0, 120)), mode="symmetric")
    tall_path = tmp / "example_ct_sm_z150.nii.gz"
    nib.save(nib.Nifti1Image(tall, sm.affine, sm.header), tall_path)
    out = []
    for name, path in [("example_ct_sm", example_ct_sm), ("example_ct", example_ct), ("sm_lps_1.5mm", lps_path),
                       ("sm_z150_2tiles", tall_path)]:
        ref_img = official_labels(path)
        out.append((name, path, np.asanyarray(ref_img.dataobj).astype(np.uint8)))
    return out


def test_official_runs_offline_and_labels_many_classes(cases, model_spec):
    from common.inference.tile_count import tiles_for_scan

    img = nib.load(cases[-1][1])
    assert tiles_for_scan(img.shape, img.header.get_zooms(), model_spec) >= 2  # the multi-tile case is one
    for name, path, ref in cases:
        img = nib.load(path)
        assert ref.shape == img.shape, name
        assert len(np.unique(ref)) > 50, f"{name}: stand-in output should contain many classes"


def test_pytorch_backed_segment_matches_official(cases, model_spec, torch_predictor, torch_reference, record_property):
    for name, path, ref in cases:
        memo = _TileMemo(torch_predictor)
        res = segment(nib.load(path), model_spec, memo, SegmentOptions())
        torch_reference.get(name, nib.load(path), memo)  # for the near-tie maps below, from the same tiles
        ours = np.asanyarray(res.labels.dataobj)
        agree = voxel_agreement(ours, ref)
        min_dice, dice = _min_dice_over_big_classes(ours, ref)
        record_property(f"{name}_torch", json.dumps({"agreement": agree, "min_dice": min_dice}))
        print(f"{name}: PyTorch backend agreement {agree:.6f}, min Dice {min_dice:.4f} over {len(dice)} classes")
        assert agree >= 0.999, name
        assert min_dice >= 0.99, name


class _TileMemo:
    """A predictor that remembers each tile's logits (keyed by the sha1 of the tile's input), so that the
    near-tie map's second sliding window over a case replays the tiles that segment() has just computed
    instead of running the network again (every tile costs 4-6 s). Outputs are the backend's own, unchanged.
    A predictor with ``tile_logits`` (the channels-last one) is run through it, as 06 runs it: the head
    applied plane by plane inside the float16 sums; the whole logits are kept for the replay."""

    def __init__(self, predictor):
        self.predictor, self.outputs, self.hits = predictor, {}, 0
        if hasattr(predictor, "tile_logits"):
            self.tile_logits = self._tile_logits

    def _replay(self, batch: np.ndarray) -> tuple[list[str], np.ndarray | None]:
        keys = [hashlib.sha1(np.ascontiguousarray(tile).tobytes()).hexdigest() for tile in batch]
        if not all(k in self.outputs for k in keys):
            return keys, None
        self.hits += len(keys)
        return keys, np.stack([self.outputs[k] for k in keys])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        keys, out = self._replay(batch)
        if out is not None:
            return out
        out = self.predictor(batch)
        self.outputs.update((k, o.copy()) for k, o in zip(keys, out, strict=True))  # the caller scales out in place
        return out

    def _tile_logits(self, batch: np.ndarray):
        from common.inference.sliding_window import ArrayLogits

        keys, out = self._replay(batch)
        if out is not None:
            return ArrayLogits(out)
        lazy = self.predictor.tile_logits(batch)
        whole = tuple(slice(None) for _ in batch.shape[2:])
        self.outputs.update((k, lazy.region(i, whole).copy()) for i, k in enumerate(keys))
        return lazy


def _model_input(data_img, model_spec):
    """The network input (1, *spatial) float32 of a scan, as segment() prepares it, and what undoes it."""
    from common.inference.pipeline import model_input
    from common.inference.preprocess import to_canonical

    can = to_canonical(data_img)
    x, crop, _ = model_input(can, model_spec)
    return x, crop, can


def _float32_logits(x, model_spec, predictor) -> np.ndarray:
    from common.inference.sliding_window import sliding_window_logits

    return sliding_window_logits(x, predictor, num_classes=model_spec.num_classes, patch_size=model_spec.patch_size,
                                 step=0.8, accumulate="float32")


class _TorchReference:
    """Per parity case, computed once per module: the float32-summed PyTorch logits (K, *spatial), the gap
    between their top two, and the float16 unit there: the coarser of the spacing at the winning logit and
    at the Gaussian-weighted sum (subnormal near tile edges)."""

    def __init__(self, model_spec, torch_predictor):
        self.spec, self.predictor = model_spec, torch_predictor
        self.cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def get(self, name: str, data_img, predictor=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, top-2 gap, float16 unit) of case ``name``; ``predictor`` (default: the PyTorch one) may
        be a _TileMemo of it that replays tiles already computed."""
        from common.inference.sliding_window import sliding_window_logits

        if name not in self.cases:
            x = _model_input(data_img, self.spec)[0]
            ones = lambda batch: np.ones((batch.shape[0], 1, *batch.shape[2:]), np.float32)  # noqa: E731
            wsum = sliding_window_logits(x, ones, num_classes=1, patch_size=self.spec.patch_size, step=0.8,
                                         accumulate="float32", normalize=False)[0]
            lt = _float32_logits(x, self.spec, predictor or self.predictor)
            top2 = np.partition(lt, lt.shape[0] - 2, axis=0)[-2:]  # [second, first]
            unit_final = np.spacing(np.abs(top2[1]).astype(np.float16)).astype(np.float32)
            unit_sum = np.spacing(np.abs(top2[1] * wsum).astype(np.float16)).astype(np.float32) / wsum
            self.cases[name] = (lt, top2[1] - top2[0], np.maximum(unit_final, unit_sum))
        return self.cases[name]


@pytest.fixture(scope="module")
def torch_reference(model_spec, torch_predictor) -> _TorchReference:
    return _TorchReference(model_spec, torch_predictor)


def _near_tie_map(data_img, model_spec, reference, other_predictor) -> np.ndarray:
    """Per voxel of the scan's grid: True where the exact-arithmetic (float32) top-2 logit gap of the
    reference network is within what the two backends' logit differences plus float16 rounding can flip:
    gap <= 2 * max_k |logit_torch - logit_other| + 8 float16 units (``reference``: _TorchReference.get)."""
    from common.inference.postprocess import resample_labels_to_shape, uncrop, undo_canonical
    from common.inference.preprocess import from_nnunet_axes

    x, crop, can = _model_input(data_img, model_spec)
    lt, gap, fp16_unit = reference
    lo = _float32_logits(x, model_spec, other_predictor)
    diff = np.abs(lt - lo).max(axis=0)
    near = (gap <= 2 * diff + 8 * fp16_unit).astype(np.uint8)
    near = from_nnunet_axes(uncrop(near, crop), model_spec.transpose_backward)
    full = resample_labels_to_shape(near, can.shape[:3])
    return np.asanyarray(undo_canonical(np.ascontiguousarray(full), can.affine, data_img.affine).dataobj) > 0


@pytest.fixture(scope="module")
def channels_last_predictor(model_spec):
    from common.inference.torch_channels_last import ChannelsLastTorchPredictor

    return ChannelsLastTorchPredictor(model_spec.build_network())


@pytest.mark.parametrize("backend", ["onnx", "channels_last"])
def test_float32_backends_match_official_up_to_near_ties(backend, cases, model_spec, ort_predictor, torch_reference,
                                                        request, record_property):
    predictor = ort_predictor if backend == "onnx" else request.getfixturevalue("channels_last_predictor")
    for name, path, ref in cases:
        img = nib.load(path)
        memo = _TileMemo(predictor)  # the near-tie map below replays segment()'s tiles
        res = segment(img, model_spec, memo, SegmentOptions())
        ours = np.asanyarray(res.labels.dataobj)
        agree = voxel_agreement(ours, ref)
        min_dice, _ = _min_dice_over_big_classes(ours, ref)
        differ = ours != ref
        near = _near_tie_map(img, model_spec, torch_reference.get(name, img), memo)
        assert memo.hits == res.n_tiles, f"{name}: the near-tie map did not see segment()'s tiles"
        near_tie_share = float(np.mean(near[differ])) if differ.any() else 1.0
        tie_rate = float(np.mean(near))
        record_property(f"{name}_{backend}", json.dumps({"agreement": agree, "min_dice": min_dice,
                                                    "near_tie_share": near_tie_share, "tie_rate": tie_rate}))
        print(f"{name}: {backend} backend agreement {agree:.6f}, min Dice {min_dice:.4f}; near-tie voxels "
              f"{tie_rate:.4%} of all, {near_tie_share:.2%} of the disagreeing ones")
        # The pipeline is the same; only the backend's arithmetic differs. Every disagreement must sit where
        # the reference's top-2 logits are closer than the two backends' logit difference (+ float16).
        assert agree >= 0.999, name
        assert min_dice >= 0.99, name
        assert near_tie_share >= 0.99, name
