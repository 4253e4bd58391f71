"""Driving the clinical app (registration/clinical_app.py) headless with streamlit's AppTest: its options, a fresh
session, the widgets of one scan, and the one-line messages it shows."""
from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "registration" / "clinical_app.py"
RUN_TIMEOUT_S = 240  # one page run: a segmentation on 2 CPUs, or a registration


@contextlib.contextmanager
def app_options(*argv: str) -> Iterator[None]:
    """While the block runs, the app's own options (what follows ``--`` on the streamlit command line)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(APP), *argv])
        yield


def new_session():
    """A fresh browser session of the app, after its first run."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=RUN_TIMEOUT_S)
    return at.run()


def no_traceback(at) -> None:
    """The page shows no exception (a traceback) — every problem must be one line."""
    assert not at.exception, [e.value for e in at.exception]


def choose(at, slot: str, *, scan: str | None = None, upload: tuple[str, bytes] | None = None,
           segmentation: str | None = None):
    """Set one scan's widgets (``slot``: single, baseline, followup): a data-folder ``scan`` id or an ``upload``
    (name, bytes); ``segmentation``: a label-map file name of the data folder (else the model segments)."""
    at.radio(key=f"{slot}_source").set_value("upload" if upload else "data folder").run()
    if upload:
        at.file_uploader(key=f"{slot}_upload").set_value((upload[0], upload[1], "application/octet-stream")).run()
        if not any(r.key == f"{slot}_segmode" for r in at.radio):
            return at  # refused before anything else (e.g. over the size limit)
    else:
        at.selectbox(key=f"{slot}_scan").set_value(scan)
    at.radio(key=f"{slot}_segmode").set_value("my own segmentation" if segmentation else "segment it with the model")
    at.run()
    if segmentation:
        at.selectbox(key=f"{slot}_seg").set_value(segmentation).run()
    return at


def page_errors(at) -> list[str]:
    """The error lines of the page, without the stand-in banner."""
    return [e.value for e in at.error if not e.value.startswith("**Stand-in weights.**")]


def cli_lines(argv: list[str]) -> list[str]:
    """What ``totalseg-fast ARGV`` prints on stderr (its one-line errors and warnings), run in this process."""
    from common.cli import console

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        console.main(argv)
    return [line for line in err.getvalue().splitlines() if line.strip()]


def without_path(line: str, name: str) -> str:
    """``line`` with every path ending in the file ``name`` written as <scan> (an upload's path is not the CLI's)."""
    return re.sub(r"\S*" + re.escape(name), "<scan>", line)
