"""Errors the suite reports to users as one clear line."""
from __future__ import annotations

from pathlib import Path

from common.core.text import one_line


class InputError(ValueError):
    """Bad user input (file, scan, passport...). ``str(err)`` is one line: '<path>: <problem>'."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = one_line(problem)
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class DownloadError(RuntimeError):
    """A download failed; the message says what failed and what to do instead."""
