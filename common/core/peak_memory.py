"""Peak resident memory (RSS) of a block of work in this process.

Linux keeps a process's peak RSS as VmHWM in /proc/self/status; writing "5" to /proc/self/clear_refs
(Linux >= 4.0) resets it to the current RSS. ``track_peak_rss()`` resets it on entry and reads it on
exit, so the figure is the peak of the whole process (its imports, the loaded model and session
included) while the block ran, not the process's lifetime peak. All threads share one address space, so
threads are counted; child processes are not.

Where clear_refs cannot be written (not Linux, a restricted container), the fallback is
``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the peak over the process's whole lifetime so far, which
can only over-state a later block. The record says which method gave the figure.
"""
from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

METHOD_VMHWM = "vmhwm_reset"            # VmHWM after a clear_refs reset: the block's own peak
METHOD_RUSAGE = "ru_maxrss_lifetime"    # fallback: the process's lifetime peak (upper bound)
METHOD_OFFICIAL_WORKER = "official_worker_ru_maxrss_self_plus_children"  # 03: the isolated worker's

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


@dataclass
class PeakRss:
    """Filled by ``track_peak_rss``: ``peak_bytes`` (set on exit) and ``method`` (one of the METHOD_*)."""

    method: str
    peak_bytes: int | None = None
    start_bytes: int | None = None


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    """This process's resident memory now (VmRSS), or None where /proc is not available."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (VmHWM := VmRSS). True when it worked."""
    if _status_kib("VmHWM") is None:
        return False
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _rusage_peak_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


@contextmanager
def track_peak_rss() -> Iterator[PeakRss]:
    """Measure the peak RSS of this process over the ``with`` block: ``.peak_bytes`` is set on exit
    (also when the block raises); ``.method`` says how (METHOD_VMHWM, else METHOD_RUSAGE)."""
    ok = reset_peak()
    rec = PeakRss(method=METHOD_VMHWM if ok else METHOD_RUSAGE, start_bytes=current_rss_bytes())
    try:
        yield rec
    finally:
        kib = _status_kib("VmHWM") if ok else None
        rec.peak_bytes = kib * 1024 if kib is not None else _rusage_peak_bytes()
        if kib is None:
            rec.method = METHOD_RUSAGE
