"""Exact-mode network backend: nnU-Net's PyTorch network run channels-last on oneDNN.

The network is the checkpoint's own ``PlainConvUNet`` with three of its modules swapped for ones that compute
the same function in float32, laid out as (N, D, H, W, C) in memory (torch's ``channels_last_3d``):

* ``InstanceNorm3d`` + ``LeakyReLU`` -> ``_SampleNorm``: torch's ``instance_norm`` copies a channels-last
  tensor to (N, C, D, H, W) and back for every call (1.9 s of 6.6 s per 112x112x128 tile, measured with
  torch.profiler on 2 threads). ``_SampleNorm`` computes each sample's statistics in float64, as torch's
  instance norm does, and normalises with torch's channels-last batch-norm kernel, in place on the
  convolution's output a few planes at a time, each block activated while still in cache.
* the first convolution (1 input channel) -> ``_OneDnnConv``: torch's dispatcher sends a 1-channel 3D
  convolution to its slow reference kernel (0.20 s); oneDNN runs it in 0.07 s and writes channels-last.
* the 1x1x1 segmentation head -> ``_ClassMajorHead``: one GEMM whose output is (N, K, D, H, W) in memory,
  the order the float16 accumulation reads, so no 118-channel transpose is needed afterwards. Through
  ``tile_logits`` (06's path) the sliding window applies it itself, a plane at a time (``HeadLogits``).

Only the float32 summation order inside convolutions and norms changes (as with ONNX Runtime); the tile
order and the float16 sums of the sliding window are untouched, so this is exact mode. Like the plain
PyTorch network, its last bits depend on the thread count (deterministic for a given count), so labels at
near-ties can differ between, say, a 2-thread process and 1-thread Dask workers. Its agreement with
the official output is measured by tests/test_parity.py.
"""
from __future__ import annotations

import copy
import functools
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from common.inference.run_config import CHANNELS_LAST

if TYPE_CHECKING:
    import torch
    from torch import nn

BACKEND = CHANNELS_LAST  # the name of this backend in a run configuration

# The three replacement modules are torch.nn.Module subclasses, but this file must import without importing
# torch. So their code lives in the module-level classes below (no torch base), and ``_modules()`` builds
# the actual classes ``_SampleNorm``, ``_OneDnnConv`` and ``_ClassMajorHead`` once, on first use, by putting
# each of them in front of ``nn.Module``; torch is imported inside the methods (a dict look-up once loaded).


class _SampleNormCode:
    """InstanceNorm3d(affine) of each sample of a channels-last tensor, statistics as torch computes them,
    optionally followed by the block's LeakyReLU (``slope``) and done in place (``inplace``).

    torch's instance norm (the official arithmetic) sums each channel in float64 on contiguous tensors;
    its channels-last batch norm sums 1.6 M values per channel in float32, which moved full-resolution
    outputs by up to 0.08 and flipped 2 % of a real CT's labels. Here the statistics are float32
    partial sums along the fastest spatial axis (<= 128 values each), added up in float64: mean first,
    then the centred sum of squares, a few planes at a time; the normalisation itself is torch's
    channels-last batch norm in inference form with those statistics (no layout copy). In place, it runs
    a few planes at a time with the LeakyReLU right after on the same planes, while they are in cache:
    the same kernels on the same values as the whole-tensor calls (bit-identical), one pass over memory
    fewer (0.075 s instead of 0.13 s per 32 x 112 x 112 x 128 tensor on 2 threads).
    """

    BLOCK = 1 << 21  # elements per step of the centred pass and of the in-place normalisation (8 MB)

    def __init__(self, norm: nn.InstanceNorm3d, slope: float | None = None, inplace: bool = False):
        super().__init__()  # nn.Module.__init__ (the next class in _SampleNorm's MRO)
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.slope, self.inplace = slope, inplace

    def _planes(self, v: torch.Tensor) -> int:
        """First-axis planes of a (D, H, W, C) view per block of about BLOCK elements."""
        return max(1, self.BLOCK // max(1, v[0].numel()))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) per channel of one sample (1, C, D, H, W), float64."""
        import torch

        v = x[0].permute(1, 2, 3, 0)  # (D, H, W, C): a view of channels-last memory
        count = v.shape[0] * v.shape[1] * v.shape[2]
        mean = v.sum(2).to(torch.float64).sum((0, 1)) / count
        centre = mean.to(torch.float32)
        squares = torch.zeros_like(mean)
        step = self._planes(v)
        dev = torch.empty((min(step, v.shape[0]), *v.shape[1:]), dtype=x.dtype)
        for d in range(0, v.shape[0], step):
            block = v[d:d + step]
            part = dev[:block.shape[0]]
            torch.sub(block, centre, out=part)
            part.mul_(part)
            squares += part.sum(2).to(torch.float64).sum((0, 1))
        return mean, squares / count

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        """One sample (1, C, D, H, W): normalised (and activated), in place or as a new tensor."""
        import torch
        import torch.nn.functional as F

        mean, var = (s.to(x.dtype) for s in self._stats(x))
        if not self.inplace:
            out = F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
            return out if self.slope is None else F.leaky_relu_(out, self.slope)
        step = self._planes(x[0].permute(1, 2, 3, 0))
        unused = torch.empty(0), torch.empty(0)  # the out variant's saved statistics (training only)
        for d in range(0, x.shape[2], step):
            block = x[:, :, d:d + step]  # planes of channels-last memory: contiguous
            # the batch-norm kernel of F.batch_norm, written over its input (elementwise, so in place is safe)
            torch.ops.aten.native_batch_norm.out(block, self.weight, self.bias, mean, var, False, 0.0, self.eps,
                                                 out=block, save_mean=unused[0], save_invstd=unused[1])
            if self.slope is not None:
                F.leaky_relu_(block, self.slope)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, D, H, W) channels-last, sample by sample; in place returns ``x`` itself."""
        import torch

        if x.shape[0] == 1:
            return self._one(x)
        if self.inplace:
            for i in range(x.shape[0]):
                self._one(x[i:i + 1])
            return x
        return torch.cat([self._one(x[i:i + 1]) for i in range(x.shape[0])])


class _OneDnnConvCode:
    """A Conv3d run by oneDNN with a channels-last weight, so that its output is channels-last."""

    def __init__(self, conv: nn.Conv3d):
        import torch
        from torch import nn

        super().__init__()  # nn.Module.__init__ (the next class in _OneDnnConv's MRO)
        self.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last_3d),
                                   requires_grad=False)
        self.bias = conv.bias
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, *self.args)


class _ClassMajorHeadCode:
    """A 1x1x1 Conv3d (C -> K) as one GEMM per sample: (K, C) @ (C, D*H*W), written (N, K, D, H, W).

    With ``emit_features`` set, it passes its input through instead (the network's last features), so
    that the caller can apply the head region by region (``region``)."""

    def __init__(self, conv: nn.Conv3d):
        import torch

        super().__init__()  # nn.Module.__init__ (the next class in _ClassMajorHead's MRO)
        k, c = conv.weight.shape[:2]
        self.weight = conv.weight.detach().reshape(k, c)
        self.bias = (conv.bias.detach() if conv.bias is not None else torch.zeros(k)).reshape(k, 1)
        self.emit_features = False

    def region(self, features: torch.Tensor, where: tuple, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (K, *region) float32 of one sample's features (C, D, H, W) channels-last, over the
        spatial slices ``where``; written into ``out`` (at least K x voxels elements) when given."""
        import torch

        rows = features.permute(1, 2, 3, 0)[where]  # (d, h, w, C): a view of channels-last memory
        spatial, c = rows.shape[:3], rows.shape[3]
        n = spatial[0] * spatial[1] * spatial[2]
        k = self.weight.shape[0]
        out = torch.empty(k * n, dtype=features.dtype) if out is None else out.view(-1)[:k * n]
        torch.addmm(self.bias, self.weight, rows.reshape(n, c).T, out=out.view(k, n))
        return out.view(k, *spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, C, D, H, W) -> logits (N, K, D, H, W) contiguous, or ``x`` with ``emit_features``."""
        import torch

        if self.emit_features:
            return x
        n, c, *spatial = x.shape
        out = torch.empty((n, self.weight.shape[0], *spatial), dtype=x.dtype)
        for i in range(n):
            self.region(x[i], (slice(None),) * 3, out=out[i])
        return out


class _Bf16ConvCode:
    """A Conv3d or ConvTranspose3d run in bfloat16 by oneDNN (approximate, ``precision="bf16"``): its float32
    channels-last input rounded to bf16, its weights and bias held in bf16, its output widened back to
    float32, so that the norms, concatenations and head around it run exactly as in float32 mode."""

    def __init__(self, conv: nn.Module):
        import torch

        super().__init__()  # nn.Module.__init__ (the next class in _Bf16Conv's MRO)
        self.inner = copy.deepcopy(conv).to(dtype=torch.bfloat16, memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return self.inner(x.to(torch.bfloat16)).to(torch.float32)


class _ModuleClasses(NamedTuple):
    """The torch.nn.Module classes built by ``_modules()``, by name."""

    SampleNorm: type
    OneDnnConv: type
    ClassMajorHead: type
    Bf16Conv: type


@functools.cache
def _modules() -> _ModuleClasses:
    """torch.nn module classes, built once on first use so that importing this file does not import torch."""
    from torch import nn

    class _SampleNorm(_SampleNormCode, nn.Module):
        __doc__ = _SampleNormCode.__doc__

    class _OneDnnConv(_OneDnnConvCode, nn.Module):
        __doc__ = _OneDnnConvCode.__doc__

    class _ClassMajorHead(_ClassMajorHeadCode, nn.Module):
        __doc__ = _ClassMajorHeadCode.__doc__

    class _Bf16Conv(_Bf16ConvCode, nn.Module):
        __doc__ = _Bf16ConvCode.__doc__

    return _ModuleClasses(SampleNorm=_SampleNorm, OneDnnConv=_OneDnnConv, ClassMajorHead=_ClassMajorHead,
                          Bf16Conv=_Bf16Conv)


def sample_norm(norm, slope: float | None = None, inplace: bool = False):
    """The channels-last replacement of one affine ``nn.InstanceNorm3d`` (its parameters shared, not copied);
    with ``slope``, the LeakyReLU that follows it is applied too; ``inplace`` overwrites its input."""
    return _modules().SampleNorm(norm, slope, inplace)


def channels_last_network(network, precision: str = "float32"):
    """A copy of nnU-Net's ``PlainConvUNet`` (eval mode) rewritten as described above, weights channels-last.

    Input: float32 (N, 1, *patch) in nnU-Net's axis order; output: float32
    (N, K, *patch) logits, contiguous. With ``precision="bf16"`` (approximate, common.inference.precision)
    every 3x3x3 and transposed convolution runs in bf16 through oneDNN (AMX or AVX512_BF16; ``_Bf16ConvCode``);
    the 1-channel first convolution, the norms, the concatenations and the head stay float32. Raises ValueError for a network that is not the plain conv U-Net
    this was written for, or an unknown precision.
    """
    import torch
    from torch import nn

    modules = _modules()
    sample_norm, onednn_conv, class_major_head = modules.SampleNorm, modules.OneDnnConv, modules.ClassMajorHead
    net = copy.deepcopy(network).eval()
    blocks = [m for m in net.modules() if hasattr(m, "all_modules") and hasattr(m, "conv")]
    heads = getattr(getattr(net, "decoder", None), "seg_layers", None)
    if not blocks or heads is None or not isinstance(heads[-1], nn.Conv3d) or heads[-1].kernel_size != (1, 1, 1):
        raise ValueError(f"{type(network).__name__} is not an nnU-Net PlainConvUNet with a 1x1x1 3D head")
    for block in blocks:
        subs = block.all_modules
        for i, sub in enumerate(subs):
            if isinstance(sub, nn.InstanceNorm3d):
                if not sub.affine or sub.track_running_stats:
                    raise ValueError("only affine InstanceNorm3d without running statistics is supported")
                after = subs[i + 1] if i + 1 < len(subs) else None
                if isinstance(after, nn.LeakyReLU):  # applied by the norm, plane block by plane block
                    subs[i] = sample_norm(sub, after.negative_slope, inplace=True)
                    subs[i + 1] = nn.Identity()
                else:
                    subs[i] = sample_norm(sub, inplace=True)
    first = blocks[0]
    if first.conv.in_channels == 1:
        index = next(i for i, sub in enumerate(first.all_modules) if sub is first.conv)
        first.all_modules[index] = onednn_conv(first.conv)
    net = net.to(memory_format=torch.channels_last_3d)
    if precision == "bf16":
        _to_bf16_convolutions(net, blocks, modules.Bf16Conv)
    elif precision != "float32":
        raise ValueError(f"unknown precision {precision!r} for the channels-last network")
    heads[-1] = class_major_head(heads[-1])
    return net


def _to_bf16_convolutions(net, blocks: list, bf16_conv: type) -> None:
    """Wrap every Conv3d of the conv blocks (not the first, 1-channel one) and every transposed convolution of
    the decoder in ``bf16_conv``, in place."""
    from torch import nn

    for block in blocks:
        subs = block.all_modules
        for i, sub in enumerate(subs):
            if isinstance(sub, nn.Conv3d) and sub.in_channels > 1:
                subs[i] = block.conv = bf16_conv(sub)
    ups = getattr(net.decoder, "transpconvs", None) or []
    for i, up in enumerate(ups):
        if isinstance(up, nn.ConvTranspose3d):
            ups[i] = bf16_conv(up)


class ChannelsLastTorchPredictor:
    """``predictor(batch)``: float32 (B, 1, *patch) -> (B, K, *patch) logits from the channels-last network."""

    backend = BACKEND

    def __init__(self, network, threads: int = 0, precision: str = "float32"):
        """``precision``: "float32" (exact) or "bf16" (approximate; the caller checks the CPU first,
        common.inference.precision.require_native)."""
        import torch

        from common.inference.predictors import set_torch_threads

        self.torch = torch
        self.precision = precision
        set_torch_threads(threads)
        self.network = channels_last_network(network, precision)
        self._lock = threading.Lock()  # the head's emit_features switch belongs to one call at a time

    def _run(self, batch: np.ndarray, features: bool = False):
        """The network on a batch: logits, or with ``features`` its last features (the head passes them on)."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        head = self.network.decoder.seg_layers[-1]
        with self._lock, torch.inference_mode():
            head.emit_features = features
            try:
                return self.network(x.contiguous(memory_format=torch.channels_last_3d))
            finally:
                head.emit_features = False

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch).numpy()

    def tile_logits(self, batch: np.ndarray) -> HeadLogits:
        """The batch's logits as ``HeadLogits``: the network runs up to its last features (B, C, *patch) and
        the head is applied region by region by the caller (see common.inference.sliding_window), so the (B, K, *patch)
        logits (757 MB per 112x112x128 tile) are never written out whole. Same GEMM per voxel as ``__call__``."""
        return HeadLogits(self._run(batch, features=True), self.network.decoder.seg_layers[-1])

    def describe(self) -> dict[str, Any]:
        from common.core.heap import freed_memory_kept
        from common.inference.precision import describe

        return {"backend": self.backend, "threads": self.torch.get_num_threads(), "layout": "channels_last_3d",
                "convolutions": "oneDNN (torch mkldnn)", "freed_memory_kept": freed_memory_kept(),
                **describe(self.precision)}


class HeadLogits:
    """Logits of a batch of tiles, computed on request from the network's last features: ``region(k, where)``
    gives float32 (K, *region) for tile k over the spatial slices ``where`` (tile coordinates, nnU-Net axes).
    The array returned is a scratch buffer, overwritten by the next call; the caller may scale it in place."""

    def __init__(self, features, head):
        self.features, self.head, self._scratch = features, head, None

    def region(self, k: int, where: tuple[slice, ...]) -> np.ndarray:
        import torch

        need = self.head.weight.shape[0] * self.features[k, 0][where].numel()  # K x the region's voxels
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=self.features.dtype)
        with torch.inference_mode():
            return self.head.region(self.features[k], where, out=self._scratch).numpy()
