"""The network's arithmetic: exact float32 (the default), or the opt-in, approximate bfloat16 network (issue 27).

``float32`` is exact mode: the official arithmetic everywhere, the network in float32 with only its summation
order free. ``bf16`` runs the network's convolutions in bfloat16 through oneDNN (AMX tiles where the CPU has
them, else AVX512_BF16 dot products): weights and activations rounded to 8 significant bits, norm statistics
and the 1x1x1 head still in float32. Everything outside the network is unchanged (resampling, the float16
logit sums in the official tile order, argmax, postprocessing), but the labels can differ from the official
tool's wherever bf16 moves a logit by more than the voxel's top-2 margin: every output of such a run says
**approximate** (``label``).

Where the CPU has no native bf16 (neither AVX512_BF16 nor AMX-BF16), oneDNN emulates it, slower than float32:
``require_native`` refuses that in one line (``PrecisionError``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

Precision = Literal["float32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
EXACT: Precision = "float32"
APPROXIMATE = "approximate"
PRECISION_HELP = ("the network's arithmetic: float32 (exact mode, the default) or bf16 (opt-in, APPROXIMATE: the "
                  "convolutions in bfloat16 through oneDNN, AMX where the CPU has it; everything else unchanged; "
                  "refused where the CPU has no native bf16); overrides the run configuration's 'precision'")


class PrecisionError(RuntimeError):
    """The precision asked for cannot run (usefully) here; the message is one line."""


def is_approximate(precision: str) -> bool:
    """True for every precision but exact float32."""
    return precision != EXACT


def label(precision: str) -> str:
    """What outputs print and record: "exact" or "approximate (bf16 network)"."""
    return "exact" if not is_approximate(precision) else f"{APPROXIMATE} ({precision} network)"


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> str | None:
    """The instruction set that runs bfloat16 natively here ("AMX-BF16" or "AVX512_BF16"), or None.

    torch's own CPU probes (what oneDNN dispatches on) first; /proc/cpuinfo's flags where torch has no probe."""
    import torch

    probes = getattr(torch, "cpu", None)
    amx = getattr(probes, "_is_amx_tile_supported", None)
    avx = getattr(probes, "_is_avx512_bf16_supported", None)
    flags = cpu_flags()
    if (amx() if amx else "amx_tile" in flags) and ("amx_bf16" in flags or not flags):
        return "AMX-BF16"
    if avx() if avx else "avx512_bf16" in flags:
        return "AVX512_BF16"
    return None


def require_native(precision: str) -> str | None:
    """None for float32; for bf16 the native instruction set, or PrecisionError (one line) without one."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if not is_approximate(precision):
        return None
    import torch

    isa = native_bf16()
    if isa is None or not torch.backends.mkldnn.is_available():
        raise PrecisionError("--precision bf16 refused: this CPU has no native bfloat16 (neither AVX512_BF16 nor "
                             "AMX-BF16), and emulated bf16 is slower than float32; use --precision float32")
    return isa


def describe(precision: str) -> dict[str, object]:
    """The record every output carries: {"precision", "approximate", "label", "native_isa"}."""
    return {"precision": precision, "approximate": is_approximate(precision), "label": label(precision),
            "native_isa": native_bf16() if is_approximate(precision) else None}
