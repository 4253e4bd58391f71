"""06's default network backend (common.inference.torch_channels_last) and the glibc heap setting (common.core.heap).

The backend must compute nnU-Net's network in float32 up to summation order: the same logits as the
PyTorch module the official tool runs (within float32 rounding), class-major and contiguous, for batches
too; its instance norm must keep torch's float64 statistics (the channels-last batch norm it replaces
moved full-resolution outputs by 0.08 on real CT). Agreement with the official labels on real CT is
tests/test_parity.py's.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from common.inference.torch_channels_last import ChannelsLastTorchPredictor, channels_last_network, sample_norm


@pytest.fixture(scope="module")
def tiny_network(tiny_standin_home):
    from common.inference.model import load_model_spec
    from common.inference.weights import standin_folder

    return load_model_spec(standin_folder(tiny_standin_home)).build_network()


def _ct_like(shape, seed=0) -> np.ndarray:
    """Float32 (B, 1, *shape): a body-like blob of soft tissue in constant air, as nnU-Net's CT normalisation
    gives it (air far below zero, tissue near zero), plus noise; large constant regions like real scans."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.6
    x = np.where(body, 0.2, -4.0) + body * rng.normal(0, 0.5, shape)
    return x[None, None].astype(np.float32)


def test_logits_equal_the_official_network_up_to_float32_rounding(tiny_network):
    x = _ct_like((32, 32, 32))
    with torch.inference_mode():
        ref = tiny_network(torch.from_numpy(x)).numpy()
    out = ChannelsLastTorchPredictor(tiny_network)(x)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]  # class-major, as the float16 accumulation reads it
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 1e-4 * scale


def test_a_batch_equals_its_samples_one_by_one(tiny_network):
    predict = ChannelsLastTorchPredictor(tiny_network)
    x = np.concatenate([_ct_like((32, 32, 32), seed=1), _ct_like((32, 32, 32), seed=2)])
    both = predict(x)
    one_by_one = np.concatenate([predict(x[:1]), predict(x[1:])])
    np.testing.assert_allclose(both, one_by_one, rtol=0, atol=1e-5 * np.abs(both).max())


def test_the_network_given_is_left_untouched(tiny_network):
    before = {k: v.clone() for k, v in tiny_network.state_dict().items()}
    net = channels_last_network(tiny_network)
    assert net is not tiny_network
    assert type(tiny_network.encoder.stages[0][0].convs[0].all_modules[1]).__name__ == "InstanceNorm3d"
    for k, v in tiny_network.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous(), k


def test_sample_norm_keeps_torchs_float64_statistics():
    """A channel with a large mean next to its spread, the case float32 sums get wrong: the replacement norm
    equals InstanceNorm3d to float32 rounding, while channels-last batch norm does not."""
    from torch import nn

    norm = nn.InstanceNorm3d(4, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]))
        norm.bias.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 96, 96, 96, generator=gen) * 0.5 + torch.tensor([30.0, -8.0, 0.0, 3.0]).view(1, 4, 1, 1, 1)
    with torch.inference_mode():
        ref = norm(x)
        cl = x.contiguous(memory_format=torch.channels_last_3d)
        ours = sample_norm(norm)(cl)
        plain_bn = nn.functional.batch_norm(cl, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
    assert ours.is_contiguous(memory_format=torch.channels_last_3d)
    ours_err = (ours - ref).abs().max().item()
    bn_err = (plain_bn - ref).abs().max().item()
    assert ours_err <= 2e-5
    assert bn_err > 10 * ours_err  # the test can tell the two apart


def test_norm_and_leaky_relu_in_place_by_plane_blocks_are_bit_identical():
    """The network's form of the norm (in place, a few planes at a time, LeakyReLU fused) against the
    whole-tensor norm followed by LeakyReLU: identical values, for one sample and for a batch of two, with
    blocks that do not divide the depth (BLOCK shrunk to 5 planes of 40 x 36)."""
    from torch import nn

    norm = nn.InstanceNorm3d(3, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
        norm.bias.copy_(torch.tensor([0.0, 0.1, -0.2]))
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 23, 40, 36, generator=gen) * 2 + 0.5).contiguous(memory_format=torch.channels_last_3d)
    fused = sample_norm(norm, 0.01, inplace=True)
    fused.BLOCK = 5 * 40 * 36 * 3
    with torch.inference_mode():
        for batch in (x[:1], x):
            ref = nn.functional.leaky_relu(sample_norm(norm)(batch), 0.01)
            work = batch.clone()
            out = fused(work)
            assert out.data_ptr() == work.data_ptr()  # in place
            assert torch.equal(out, ref)
            assert (ref < 0).any() and (ref > 0).any()


def test_other_networks_are_refused():
    from torch import nn

    with pytest.raises(ValueError, match="not an nnU-Net PlainConvUNet"):
        channels_last_network(nn.Sequential(nn.Conv3d(1, 2, 3)))


_FAULTS = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from common.core.heap import freed_memory_kept, set_keep_freed_memory
    state = set_keep_freed_memory(sys.argv[1] == "keep")
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(64 * 2**20 // 8)  # 64 MB: above glibc's largest mmap threshold
        del a
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"state": state, "kept": freed_memory_kept(), "faults": faults}))
""")


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere set_keep_freed_memory is a no-op")
def test_kept_freed_memory_is_reused_without_page_faults():
    """64 MB arrays allocated and freed 6 times: by default every one is faulted in afresh (at least 32 faults:
    16 k pages of 4 KiB, or 32 huge pages where numpy asks for them); with freed memory kept, the ones after
    the first reuse the heap's pages."""
    runs = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["default"]["state"] is False and runs["keep"]["state"] is True and runs["keep"]["kept"] is True
    assert min(runs["default"]["faults"][1:]) >= 64 // 2
    assert max(runs["keep"]["faults"][1:]) <= 4


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere set_keep_freed_memory is a no-op")
def test_the_setting_goes_back_to_glibcs_defaults():
    from common.core.heap import freed_memory_kept, set_keep_freed_memory

    try:
        assert set_keep_freed_memory(True) is True and freed_memory_kept()
        assert set_keep_freed_memory(False) is False and not freed_memory_kept()
    finally:
        set_keep_freed_memory(False)


@pytest.mark.parametrize("shape,planes", [((70, 50, 45), 1), ((45, 50, 20), 3)])
def test_head_applied_plane_by_plane_gives_the_labels_of_the_whole_logits(tiny_network, shape, planes, monkeypatch):
    """06's path (tile_logits: the head applied a few planes at a time inside the float16 sums, slab argmax)
    against nnU-Net's: the same network's whole (B, K, *patch) logits through a plain callable, summed over
    the whole volume, then argmax. Volumes of several 32^3 tiles (the second thinner than a tile along x:
    padded, partial overlaps), batches of 1 and 2: identical labels."""
    from common.inference.sliding_window import _SlabSums, argmax_first, sliding_window_labels, sliding_window_logits

    monkeypatch.setattr(_SlabSums, "PLANES", planes)
    predict = ChannelsLastTorchPredictor(tiny_network)
    data = _ct_like(shape, seed=3)[0]
    for batch in (1, 2):
        kw = dict(num_classes=118, patch_size=(32, 32, 32), step=0.5, batch_size=batch)
        by_planes = sliding_window_labels(data, predict, **kw)
        whole = argmax_first(sliding_window_logits(data, lambda b: predict(b), **kw))
        assert len(np.unique(whole)) > 20
        assert np.array_equal(by_planes, whole), f"batch {batch}: {np.mean(by_planes != whole):.2e} of voxels differ"
