"""07's cohort table: a cohort benchmark's result (cohort_benchmark.py, "ts-bench-cohort") as Markdown lines."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.core.errors import InputError

COHORT_SCHEMA = "ts-bench-cohort"


def read_cohort(path: str | Path) -> dict[str, Any]:
    """A cohort result; InputError (one line) when it is unreadable or another document."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable cohort result ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("schema") != COHORT_SCHEMA or not isinstance(doc.get("methods"), list):
        raise InputError(path, f"not a {COHORT_SCHEMA} document")
    return doc


def _num(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def render_cohort(doc: dict[str, Any]) -> list[str]:
    """Markdown lines of "## Cohort": the scans (count, tiles) and one row per method: wall time, scans ok,
    scans per hour, scans per core-hour, x the official tool's scans per hour, peak RSS of the process tree."""
    scans = doc.get("cohort", [])
    tiles = [s.get("tiles", 0) for s in scans]
    out = ["## Cohort", "",
           f"{len(scans)} scans ({min(tiles, default=0)}–{max(tiles, default=0)} tiles, {sum(tiles)} in all; "
           f"weights: {doc.get('weights', '?')}), each method once in a fresh process.", "",
           "| Method | Wall (s) | Scans ok | Scans/h | Scans per core-hour | × official (scans/h) | Peak RSS (GiB) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for m in doc["methods"]:
        name = m["method"] + (" — **APPROXIMATE**" if "bf16" in m["method"] else "")
        if m.get("timed_out"):
            name += " (timed out)"
        rss = m.get("peak_rss_bytes")
        out.append(f"| {name} | {_num(m.get('wall_s'), '.1f')} | {m.get('scans_ok')}/{m.get('scans')} | "
                   f"{_num(m.get('scans_per_hour'), '.1f')} | {_num(m.get('scans_per_core_hour'), '.1f')} | "
                   f"{_num(m.get('x_reference_scans_per_hour'), '.2f')} | "
                   f"{'—' if not rss else format(rss / 2**30, '.2f')} |")
    out += ["", "Peak RSS: the whole process tree (workers included), summed, sampled every 0.25 s.", ""]
    return out
