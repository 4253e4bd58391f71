"""Exact-mode network backend: nnU-Net's PyTorch network run channels-last on oneDNN.

The network is the checkpoint's own ``PlainConvUNet`` with three of its modules swapped for ones that compute
the same function in float32, laid out as (N, D, H, W, C) in memory (torch's ``channels_last_3d``):

* ``InstanceNorm3d`` -> ``_SampleNorm``: torch's ``instance_norm`` copies a channels-last tensor to
  (N, C, D, H, W) and back for every call (1.9 s of 6.6 s per 112x112x128 tile, measured with
  torch.profiler on 2 threads). ``_SampleNorm`` computes each sample's statistics in float64, as torch's
  instance norm does, and normalises with torch's channels-last batch-norm kernel.
* the first convolution (1 input channel) -> ``_OneDnnConv``: torch's dispatcher sends a 1-channel 3D
  convolution to its slow reference kernel (0.20 s); oneDNN runs it in 0.07 s and writes channels-last.
* the 1x1x1 segmentation head -> ``_ClassMajorHead``: one GEMM whose output is (N, K, D, H, W) in memory,
  the order the float16 accumulation reads, so no 118-channel transpose is needed afterwards.

Only the float32 summation order inside convolutions and norms changes (as with ONNX Runtime); the tile
order and the float16 sums of the sliding window are untouched, so this is exact mode. Like the plain
PyTorch network, its last bits depend on the thread count (deterministic for a given count), so labels at
near-ties can differ between, say, a 2-thread process and 1-thread Dask workers. Its agreement with
the official output is measured by tests/test_parity.py.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np

BACKEND = "pytorch_channels_last"


@functools.cache
def _modules():
    """torch.nn module classes, built once on first use so that importing this file does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class _SampleNorm(nn.Module):
        """InstanceNorm3d(affine) of each sample of a channels-last tensor, statistics as torch computes them.

        torch's instance norm (the official arithmetic) sums each channel in float64 on contiguous tensors;
        its channels-last batch norm sums 1.6 M values per channel in float32, which moved full-resolution
        outputs by up to 0.08 and flipped 2 % of a real CT's labels. Here the statistics are float32
        partial sums along the fastest spatial axis (<= 128 values each), added up in float64: mean first,
        then the centred sum of squares, a few planes at a time; the normalisation itself is torch's
        channels-last batch norm in inference form with those statistics (one pass, no layout copy).
        """

        BLOCK = 1 << 21  # elements per step of the centred pass (8 MB of float32 temporaries)

        def __init__(self, norm: nn.InstanceNorm3d):
            super().__init__()
            self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

        def _stats(self, x):
            """(mean, biased variance) per channel of one sample (1, C, D, H, W), float64."""
            v = x[0].permute(1, 2, 3, 0)  # (D, H, W, C): a view of channels-last memory
            count = v.shape[0] * v.shape[1] * v.shape[2]
            mean = v.sum(2).to(torch.float64).sum((0, 1)) / count
            centre = mean.to(torch.float32)
            squares = torch.zeros_like(mean)
            step = max(1, self.BLOCK // max(1, v[0].numel()))
            for d in range(0, v.shape[0], step):
                dev = v[d:d + step] - centre
                squares += (dev * dev).sum(2).to(torch.float64).sum((0, 1))
            return mean, squares / count

        def _one(self, x):
            mean, var = self._stats(x)
            return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), self.weight, self.bias, False, 0.0, self.eps)

        def forward(self, x):
            if x.shape[0] == 1:
                return self._one(x)
            return torch.cat([self._one(x[i:i + 1]) for i in range(x.shape[0])])

    class _OneDnnConv(nn.Module):
        """A Conv3d run by oneDNN with a channels-last weight, so that its output is channels-last."""

        def __init__(self, conv: nn.Conv3d):
            super().__init__()
            self.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last_3d),
                                       requires_grad=False)
            self.bias = conv.bias
            self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

        def forward(self, x):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, *self.args)

    class _ClassMajorHead(nn.Module):
        """A 1x1x1 Conv3d (C -> K) as one GEMM per sample: (K, C) @ (C, D*H*W), written (N, K, D, H, W)."""

        def __init__(self, conv: nn.Conv3d):
            super().__init__()
            k, c = conv.weight.shape[:2]
            self.weight = conv.weight.detach().reshape(k, c)
            self.bias = (conv.bias.detach() if conv.bias is not None else torch.zeros(k)).reshape(k, 1)

        def forward(self, x):
            n, c, *spatial = x.shape
            out = torch.empty((n, self.weight.shape[0], *spatial), dtype=x.dtype)
            for i in range(n):
                rows = x[i].permute(1, 2, 3, 0).reshape(-1, c)  # (D*H*W, C): a view of a channels-last tensor
                torch.addmm(self.bias, self.weight, rows.T, out=out[i].view(self.weight.shape[0], -1))
            return out

    return torch, nn, _SampleNorm, _OneDnnConv, _ClassMajorHead


def sample_norm(norm):
    """The channels-last replacement of one affine ``nn.InstanceNorm3d`` (its parameters shared, not copied)."""
    return _modules()[2](norm)


def channels_last_network(network):
    """A copy of nnU-Net's ``PlainConvUNet`` (eval mode) rewritten as described above, weights channels-last.

    Input: float32 (N, 1, *patch) in nnU-Net's axis order; output: float32 (N, K, *patch) logits, contiguous.
    Raises ValueError for a network that is not the plain conv U-Net this was written for.
    """
    torch, nn, sample_norm, onednn_conv, class_major_head = _modules()
    net = copy.deepcopy(network).eval()
    blocks = [m for m in net.modules() if hasattr(m, "all_modules") and hasattr(m, "conv")]
    heads = getattr(getattr(net, "decoder", None), "seg_layers", None)
    if not blocks or heads is None or not isinstance(heads[-1], nn.Conv3d) or heads[-1].kernel_size != (1, 1, 1):
        raise ValueError(f"{type(network).__name__} is not an nnU-Net PlainConvUNet with a 1x1x1 3D head")
    for block in blocks:
        for i, sub in enumerate(block.all_modules):
            if isinstance(sub, nn.InstanceNorm3d):
                if not sub.affine or sub.track_running_stats:
                    raise ValueError("only affine InstanceNorm3d without running statistics is supported")
                block.all_modules[i] = sample_norm(sub)
    first = blocks[0]
    if first.conv.in_channels == 1:
        index = next(i for i, sub in enumerate(first.all_modules) if sub is first.conv)
        first.all_modules[index] = onednn_conv(first.conv)
    net = net.to(memory_format=torch.channels_last_3d)
    heads[-1] = class_major_head(heads[-1])
    return net


class ChannelsLastTorchPredictor:
    """``predictor(batch)``: float32 (B, 1, *patch) -> (B, K, *patch) logits from the channels-last network."""

    backend = BACKEND

    def __init__(self, network, threads: int = 0):
        import torch

        from common.session import set_torch_threads

        self.torch = torch
        set_torch_threads(threads)
        self.network = channels_last_network(network)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.inference_mode():
            out = self.network(x.contiguous(memory_format=torch.channels_last_3d))
        return out.numpy()

    def describe(self) -> dict[str, Any]:
        from common.heap import freed_memory_kept

        return {"backend": self.backend, "threads": self.torch.get_num_threads(), "layout": "channels_last_3d",
                "convolutions": "oneDNN (torch mkldnn)", "freed_memory_kept": freed_memory_kept()}
