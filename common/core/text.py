"""Text for people and documents: one-line messages, byte counts, number vectors and UTC timestamps."""
from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space; with ``limit``, cut to
    at most that many characters (the last one an ellipsis)."""
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def fmt_bytes(n: int | float) -> str:
    """A byte count as B, KiB, MiB or GiB with one decimal."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def fmt_vec(values: Iterable[float], fmt: str = ".4g") -> str:
    """Numbers as "(a, b, c)", each formatted with ``fmt`` ("d" for integers, e.g. a shape)."""
    return "(" + ", ".join(format(int(v) if fmt == "d" else float(v), fmt) for v in values) + ")"


def fmt_shape(values: Iterable[float], fmt: str = "d") -> str:
    """A shape as "512x512x200" (or other numbers joined by "x", each formatted with ``fmt``)."""
    return "x".join(format(int(v) if fmt == "d" else float(v), fmt) for v in values)


def utc_now() -> str:
    """Current time, ISO-8601 UTC to the second, e.g. "2025-01-01T12:00:00Z"."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
