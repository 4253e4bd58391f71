"""This machine's compute peak per precision, measured with the fastest kernel available (issue 27, item 1).

A compute limit the program beats is not a limit. The issue's 2-core AMD EPYC ran ``torch.mm`` (MKL, its
non-AVX-512 path there) at 181 GFLOPS while oneDNN's convolutions in the network sustained about 310: an
"efficiency" of 167 %. So each precision's peak here is the best of several kernels, each timed as the best
of a few runs after one warm-up, on the threads the benchmark uses:

* ``torch.mm`` of n x n matrices (MKL for float32, oneDNN for bfloat16);
* a large channels-last 1x1x1 convolution through oneDNN (a GEMM with the network's own data layout);
* channels-last 3x3x3 convolutions through oneDNN at the shapes of the Task 297 network's stages
  (32 channels at 128x112x112 ... 256 at 16x14x14, the issue's probe), the kernels the network itself runs;
* int8: ``torch._int_mm`` (VNNI / AMX-INT8 where present), when this torch build has it on the CPU.

A precision the CPU has no native instructions for is not timed (``native_isa``): emulated, its kernels are
hundreds of times slower (a 2-core Zen 2 EPYC, AVX2 only: bf16 ``torch.mm`` 0.76 GFLOPS, int8 1.7 GOPS, float32
54), so timing them would take many minutes and name a "peak" nothing should run at. Such a precision's record
has ``gflops`` None and ``skipped`` saying why.

The record names every kernel's rate and which one won. The theoretical float32 peak (cores x AVX lanes x
2 FMA units x 2 FLOP x clock) is recorded beside it where the clock can be read, as a ceiling only: the number
of FMA units per core is not visible from software (assumed 2), so it is never used as the limit itself, but
a measured kernel above it says the clock figure is wrong (``above_theoretical``).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

PRECISIONS = ("float32", "bf16", "int8")
# (channels, (D, H, W)): 3x3x3 convolutions of the Task 297 PlainConvUNet's stages (C -> C, padding 1)
CONV_SHAPES: tuple[tuple[int, tuple[int, int, int]], ...] = (
    (32, (128, 112, 112)), (64, (64, 56, 56)), (128, (32, 28, 28)), (256, (16, 14, 14)))
POINTWISE = (256, (32, 32, 32))  # a 1x1x1 convolution: (32768 x 256) @ (256 x 256) through oneDNN
MM_N = 4096
REPEATS = 3


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``run`` after one warm-up call, in seconds."""
    run()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def _mm(dtype, n: int, repeats: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    s = _best_seconds(lambda: torch.mm(a, b), repeats)
    return {"kernel": f"torch.mm {n}x{n}", "gflops": 2.0 * n ** 3 / s / 1e9, "best_s": s}


def _conv(dtype, channels: int, spatial: tuple[int, int, int], k: int, repeats: int) -> dict:
    """One channels-last Conv3d C -> C (kernel k, 'same' padding) through oneDNN (torch's mkldnn op)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, *spatial, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(channels, channels, k, k, k, generator=gen) * 0.05).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last_3d)
    bias = torch.zeros(channels, dtype=dtype)
    pad = [k // 2] * 3

    def run():
        with torch.inference_mode():
            return torch.ops.aten.mkldnn_convolution(x, w, bias, pad, [1, 1, 1], [1, 1, 1], 1)

    s = _best_seconds(run, repeats)
    flops = 2.0 * channels * channels * k ** 3 * math.prod(spatial)
    shape = "x".join(map(str, spatial))
    return {"kernel": f"oneDNN channels-last conv {k}x{k}x{k} {channels}->{channels} at {shape}",
            "gflops": flops / s / 1e9, "best_s": s}


def _int_mm(n: int, repeats: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-64, 64, (n, n), generator=gen, dtype=torch.int8) for _ in range(2))
    s = _best_seconds(lambda: torch._int_mm(a, b), repeats)
    return {"kernel": f"torch._int_mm int8 {n}x{n}", "gflops": 2.0 * n ** 3 / s / 1e9, "best_s": s}


def _kernels(precision: str, repeats: int, full: bool) -> list[tuple[str, Callable[[], dict]]]:
    """(name, timed call) of each candidate kernel of one precision (``full``: every stage shape and n = 4096;
    else the two smallest stages and n = 1024, for tests)."""
    import torch

    n = MM_N if full else 1024
    if precision == "int8":
        return [("torch._int_mm int8", lambda: _int_mm(n, repeats))]
    dtype = torch.float32 if precision == "float32" else torch.bfloat16
    shapes = CONV_SHAPES if full else CONV_SHAPES[-2:]
    pointwise = POINTWISE if full else (POINTWISE[0], (16, 16, 16))
    return [("torch.mm", lambda: _mm(dtype, n, repeats)),
            ("oneDNN conv 1x1x1", lambda: _conv(dtype, pointwise[0], pointwise[1], 1, repeats)),
            *[(f"oneDNN conv 3x3x3 {c}", lambda c=c, s=s: _conv(dtype, c, s, 3, repeats)) for c, s in shapes]]


def native_isa(precision: str) -> str | None:
    """The instruction set that runs ``precision`` natively on this CPU, or None: float32 always (torch's CPU
    capability, e.g. "AVX2", "AVX512"); bf16 AMX-BF16 / AVX512_BF16 (``common.inference.precision.native_bf16``); int8
    AMX-INT8 / AVX512_VNNI / AVX_VNNI from /proc/cpuinfo's flags."""
    import torch

    from common.inference.precision import cpu_flags, native_bf16

    if precision == "float32":
        return torch.backends.cpu.get_cpu_capability()
    if precision == "bf16":
        return native_bf16()
    flags = cpu_flags()
    for flag, isa in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512_VNNI"), ("avx_vnni", "AVX_VNNI")):
        if flag in flags:
            return isa
    return None


def measure_peak(precision: str, threads: int, repeats: int = REPEATS, full: bool = True) -> dict:
    """The peak of ``precision`` ("float32", "bf16", "int8") on ``threads`` threads: {"precision", "gflops"
    (the best kernel's rate, GFLOPS or for int8 GOPS), "kernel" (its name), "kernels" (every candidate:
    {"kernel", "gflops", "best_s"} or {"kernel", "error"}), "threads", "repeats"}. ``gflops`` is None when no
    kernel of the precision ran (e.g. int8 without ``torch._int_mm`` on this CPU), and then also when the CPU
    has no native instructions for it: nothing is timed and "skipped" says why ("native_isa" names them)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    isa = native_isa(precision)
    record = {"precision": precision, "threads": max(1, threads), "repeats": repeats, "native_isa": isa}
    if isa is None:
        return {**record, "gflops": None, "kernel": None, "kernels": [],
                "skipped": f"not timed: this CPU has no native {precision} instructions (emulated, far slower than "
                           "float32)"}
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    rows: list[dict] = []
    try:
        for name, kernel in _kernels(precision, repeats, full):
            try:
                rows.append(kernel())
            except (RuntimeError, NotImplementedError, AttributeError) as exc:  # not in this build / CPU
                rows.append({"kernel": name, "error": (str(exc).splitlines() or [type(exc).__name__])[0]})
    finally:
        torch.set_num_threads(previous)
    timed = [r for r in rows if "gflops" in r]
    best = max(timed, key=lambda r: r["gflops"]) if timed else None
    return {**record, "gflops": best["gflops"] if best else None, "kernel": best["kernel"] if best else None,
            "kernels": rows}


def _clock_ghz() -> tuple[float | None, str | None]:
    """The highest clock the kernel reports (cpufreq's maximum, else /proc/cpuinfo's "cpu MHz"), in GHz."""
    path = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(path.read_text().strip()) / 1e6, str(path)
    except (OSError, ValueError):
        pass
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except (OSError, ValueError, IndexError):
        return None, None
    return (max(mhz) / 1e3, "/proc/cpuinfo cpu MHz (the current clock; turbo may be higher)") if mhz else (None, None)


def theoretical_float32(threads: int) -> dict | None:
    """cores x float32 lanes (16 with AVX-512, 8 with AVX2) x 2 FMA units (assumed) x 2 FLOP x clock, in
    GFLOPS; None where the clock or the vector width cannot be read."""
    import torch

    ghz, source = _clock_ghz()
    capability = torch.backends.cpu.get_cpu_capability()
    lanes = 16 if capability.startswith("AVX512") else 8 if capability.startswith("AVX2") else None
    if not ghz or not lanes:
        return None
    cores = max(1, min(threads, os.cpu_count() or 1))
    return {"gflops": cores * lanes * 2 * 2 * ghz, "cores": cores, "lanes": lanes, "fma_units_assumed": 2,
            "clock_ghz": ghz, "clock_source": source, "cpu_capability": capability}


def machine_peaks(threads: int, precisions: tuple[str, ...] = PRECISIONS, repeats: int = REPEATS,
                  full: bool = True) -> dict:
    """{"peaks": {precision: measure_peak(...)}, "theoretical_float32": theoretical_float32(...) | None,
    "above_theoretical": True when the float32 kernel beat the theoretical figure (the clock read is wrong)}."""
    peaks = {p: measure_peak(p, threads, repeats, full) for p in precisions}
    theory = theoretical_float32(threads)
    measured = peaks.get("float32", {}).get("gflops")
    return {"peaks": peaks, "theoretical_float32": theory,
            "above_theoretical": bool(theory and measured and measured > theory["gflops"])}
