"""The command line of the passport picture scripts (08, 09): options, the run and its one-line errors."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from common.cli.args import check_outputs, script_parser
from common.core.errors import InputError
from common.records.passport import Passport, load_passport
from common.reporting.plots_passport import DisplayScan, default_out, load_display_scan, save_png, scan_path_for


def cli_parser(description: str, out_suffix: str) -> argparse.ArgumentParser:
    """The command-line interface shared by the passport picture scripts (errors: one line, exit 2)."""
    parser = script_parser(description)
    parser.add_argument("--passport", required=True, type=Path, metavar="P.json",
                        help="anatomical passport JSON (schema 'anatomical-passport' version 1)")
    parser.add_argument("--scan", type=Path, metavar="SCAN", default=None,
                        help="CT scan (NIfTI file or DICOM folder) to draw on; default: the passport's scan.file")
    parser.add_argument("--out", type=Path, metavar="PNG", default=None,
                        help=f"output PNG; default: next to the passport, <stem>{out_suffix}.png")
    return parser


def _fail(err: Exception, code: int) -> int:
    """Print ``err`` as one line on stderr (an OSError as '<file>: <reason>'); return ``code``."""
    text = str(err)
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    print("error: " + " ".join(text.split()), file=sys.stderr)
    return code


def run_picture(args: argparse.Namespace, out_suffix: str,
                draw: Callable[[Passport, Path, Path, DisplayScan], Figure],
                check: Callable[[Passport, Path], None] | None = None) -> int:
    """What 08 and 09 do with their parsed ``args``: refuse an unwritable --out before any work, load and
    check the passport (``check(passport, passport_path)`` may raise InputError), load its scan, make the
    figure with ``draw(passport, passport_path, scan_path, scan)`` and write the PNG; print its path.
    Exit code 0, 2 for bad input or output, 1 for other OS errors."""
    out = args.out or default_out(args.passport, out_suffix)
    try:
        check_outputs(files=(out,))
    except OSError as err:
        return _fail(err, 2)
    try:
        passport = load_passport(args.passport)
        if check is not None:
            check(passport, args.passport)
        scan_path = scan_path_for(passport, args.passport, args.scan)
        save_png(draw(passport, args.passport, scan_path, load_display_scan(scan_path)), out)
    except InputError as err:
        return _fail(err, 2)
    except OSError as err:
        return _fail(err, 1)
    print(out)
    return 0
