"""Finding processes a test started, by a marker in their environment (they may have been re-parented)."""
from __future__ import annotations

from pathlib import Path


def live_processes(env_marker: str, cmdline_part: str | None = None) -> list[int]:
    """Pids of live (not zombie) processes whose environment holds ``env_marker`` (e.g. "NAME=value") and,
    when given, whose command line holds ``cmdline_part``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if env_marker.encode() in env and state != "Z" and (cmdline_part is None or cmdline_part.encode() in cmdline):
            found.append(int(proc.name))
    return found
