"""Keep freed memory in this process's heap (glibc), so that big short-lived arrays reuse pages.

glibc serves every allocation above 32 MB with a fresh ``mmap`` and gives it back with ``munmap`` on free,
so each of the network's activations (one 32-channel 112x112x128 float32 tensor is 205 MB) is faulted in
and zeroed by the kernel again on every tile: 0.88 M page faults and 1.6 s of system CPU time per tile on
2 threads, measured with getrusage around one call of the channels-last network. ``mallopt`` with
``M_MMAP_MAX = 0`` (no mmap for allocations) and no ``M_TRIM_THRESHOLD`` (never give the heap's top back)
keeps freed blocks for reuse: after the first tile, no page faults and 3.0 s instead of 3.9-4.9 s
per tile. The price is a higher resident peak, because freed blocks are not all reusable for the next
request (3.2 GB instead of 1.8 GB for one tile's network alone).

This is process-wide and lasts for the life of the process; it changes nothing outside it. glibc has no
library interface for it besides ``mallopt``, hence ctypes. Elsewhere (musl, macOS, Windows) it is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
# mallopt takes an int and glibc stores the trim threshold as a size_t: -1 becomes SIZE_MAX, "never trim". The
# largest positive value (2**31 - 1) is not enough: the heap's free top reaches 2 GB during a tile, and was then
# trimmed and faulted in again on every tile (0.54 M faults per tile in some processes, none in others).
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1}
DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}  # glibc's documented defaults

_kept = False


def _libc():
    """glibc through ctypes, or None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def set_keep_freed_memory(keep: bool) -> bool:
    """Make glibc's malloc keep freed memory for reuse (``keep=True``, see the module docstring) or go back to
    its documented defaults (mmap for large blocks, trim above 128 KiB; glibc's dynamic mmap threshold stays
    where it is). Returns whether freed memory is kept now: always False where the C library is not glibc."""
    global _kept
    if keep == _kept:
        return _kept
    libc = _libc()
    if libc is None:
        return False
    settings = KEEP if keep else DEFAULTS
    if all(libc.mallopt(param, value) == 1 for param, value in settings.items()):
        _kept = keep
    return _kept


def freed_memory_kept() -> bool:
    """Whether freed memory is kept in this process now (``set_keep_freed_memory``)."""
    return _kept
