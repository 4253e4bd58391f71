"""The console streams of a script or a worker process."""
from __future__ import annotations

import sys


def setup_console() -> None:
    """Make stdout/stderr replace what their encoding cannot write (backslash escapes) instead of raising: a
    terminal or CI log that is not UTF-8 must not crash a script over a dash or an ellipsis in a message."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")
