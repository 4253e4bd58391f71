"""Command-line plumbing every script shares: checked option types, one-line argparse errors, output checks
made before any work, one-line failures, a console that survives any encoding, and a clean exit on Ctrl-C.

argparse is the library; what it lacks is written here: value types that refuse negative counts, NaN and
infinity (``--max-points -5`` must not reach the code), and an error that is ONE line (argparse prints the
whole usage first).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.core.streams import setup_console
from common.core.text import one_line

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class OneLineParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line on stderr (``prog: error: ...``), exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse's API
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def script_parser(description: str | None, **kwargs) -> OneLineParser:
    """The parser of a numbered script: its module docstring as help text, kept as written."""
    return OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, "an integer >= 1", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, "a finite number > 0", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def unit_fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    return _number(text, float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def writable_folder_problem(folder: Path) -> str | None:
    """None if ``folder`` exists or can be created and a file can be written in it, else why not (one line)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{folder}: exists and is not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{folder}: cannot write there ({exc.strerror or type(exc).__name__})"
    return None


def writable_file_problem(path: Path) -> str | None:
    """None if ``path`` can be written (atomically: a temporary file beside it, then a rename), else why not."""
    path = Path(path)
    if path.is_dir():
        return f"{path}: is a folder, expected a file name"
    problem = writable_folder_problem(path.parent)
    if problem is None and path.exists() and not os.access(path, os.W_OK):
        problem = f"{path}: exists and is read-only"
    return problem


def check_outputs(*, folders: tuple[Path, ...] = (), files: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, outputs that cannot be written: raises OSError with a one-line message."""
    for problem in [*(writable_folder_problem(f) for f in folders), *(writable_file_problem(f) for f in files)]:
        if problem:
            raise OSError(problem)


def fail(message: object, code: int = 2) -> int:
    """Print ``message`` as one line to stderr and return the exit code."""
    print(one_line(message), file=sys.stderr)
    return code


def run_script(main: Callable[[], int]) -> int:
    """Call a script's ``main()`` after setup_console(); Ctrl-C anywhere ends with one line on stderr and exit
    code 130 (a batch loop that catches it first writes its partial record before this)."""
    setup_console()
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
