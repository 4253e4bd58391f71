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


def default_sigint() -> None:
    """``preexec_fn`` for a child a test will interrupt with SIGINT: SIGINT back to its default action.

    A job started in the background of a non-interactive shell (``pytest &``, ``nohup``) inherits SIGINT ignored,
    and Python then installs no KeyboardInterrupt handler: the child would ignore the test's Ctrl-C and run to the
    end, as POSIX asks of such a job (seen: the suite run with ``nohup ... &``)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
