"""Where a benchmark ran: CPU, cores, memory, OS and library versions (recorded in every result JSON).

Reads /proc and package metadata only; importing this module never imports torch or onnxruntime.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import socket
from pathlib import Path

# Distribution names tried for each reported library (first installed one wins).
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "totalsegmentator": ("TotalSegmentator", "totalsegmentator"),
    "nnunetv2": ("nnunetv2",),
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "nibabel": ("nibabel",),
    "onnx": ("onnx",),
}


def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _meminfo_bytes(key: str) -> int | None:
    """A /proc/meminfo field (e.g. "MemTotal", "MemAvailable") in bytes; None where unreadable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # value in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_bytes(pages: str) -> int | None:
    """``pages`` ("SC_PHYS_PAGES", "SC_AVPHYS_PAGES") times the page size, in bytes; None where unknown."""
    try:
        return int(os.sysconf(pages)) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages via os.sysconf, else None."""
    found = _meminfo_bytes("MemAvailable")
    return found if found is not None else _sysconf_bytes("SC_AVPHYS_PAGES")


def _ram_gib() -> float | None:
    """Total RAM in GiB from /proc/meminfo (else os.sysconf); None where unavailable."""
    found = _meminfo_bytes("MemTotal")
    found = found if found is not None else _sysconf_bytes("SC_PHYS_PAGES")
    return None if found is None else round(found / 2**30, 2)


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup cpuset), else os.cpu_count(); at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def machine_info() -> dict:
    """Describe this machine: cpu_model, logical_cores, usable_cores, ram_gib (GiB), os, machine (arch),
    python, hostname_sha256 (first 12 hex digits of the SHA-256 of the host name; the name itself is not stored)."""
    try:
        host = socket.gethostname()
    except OSError:
        host = ""
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "hostname_sha256": hashlib.sha256(host.encode()).hexdigest()[:12] if host else None,
    }


def _dist_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def library_versions() -> dict:
    """Versions of python and the libraries that shape the results (None when not installed).

    Read from package metadata (importlib.metadata), so no library is imported to learn its version.
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, names in _DISTRIBUTIONS.items():
        out[key] = _dist_version(names)
    return out
