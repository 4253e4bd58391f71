#!/usr/bin/env python
"""Draw the vertebrae centroids of an anatomical passport as a labelled chain over coronal and sagittal MIPs.

Vertebrae are the structures named "vertebrae_<C|T|L|S><n>", ordered anatomically C1..C7, T1..T12,
L1..L5, S1, followed by "sacrum" when present. Exits with code 2 if the passport has no vertebrae.

    python 09_visualize_spine.py --passport out/example_passport.json
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.cli.args import run_script
from common.cli.passport_figure import cli_parser, run_picture
from common.core.errors import InputError
from common.records.passport import Passport, Structure
from common.reporting.plots_passport import VIEWS, DisplayScan, project, view_figure, weights_caption
from common.reporting.plots_passport import default_out as _default_out

OUT_SUFFIX = "_spine"
REGIONS = "CTLS"  # cervical, thoracic, lumbar, sacral: cranial to caudal
VERTEBRA = re.compile(r"^vertebrae_([CTLS])(\d+)$")


def default_out(passport_path: str | Path) -> Path:
    """<passport folder>/<passport stem>_spine.png"""
    return _default_out(passport_path, OUT_SUFFIX)


def spine_key(name: str) -> tuple[int, int] | None:
    """Anatomical sort key (cranial first) of a vertebra or the sacrum; None for other structures."""
    if name == "sacrum":
        return (len(REGIONS), 0)
    match = VERTEBRA.match(name)
    if match is None:
        return None
    return (REGIONS.index(match.group(1)), int(match.group(2)))


def spine_chain(structures: Sequence[Structure]) -> list[Structure]:
    """Vertebrae (and sacrum) among ``structures`` (a passport's), in anatomical order, cranial to caudal."""
    spine = [s for s in structures if spine_key(s.name) is not None]
    return sorted(spine, key=lambda s: spine_key(s.name))


def short_name(name: str) -> str:
    """'vertebrae_L1' -> 'L1'; other names unchanged."""
    return name.removeprefix("vertebrae_")


def draw_spine(chain: list[Structure], scan: DisplayScan, title: str):
    """Figure with coronal and sagittal MIPs and the centroid chain with text labels."""
    views = [VIEWS["coronal"], VIEWS["sagittal"]]
    fig, axes = view_figure(scan, views, height_in=7.0, max_width_in=14.0)
    centres = scan.to_display(np.array([s.centroid_mm for s in chain]))
    for ax, view in zip(axes, views, strict=True):
        h, v = project(centres, view)
        ax.plot(h, v, "-", color="orange", linewidth=1.5, zorder=2)
        ax.scatter(h, v, s=30, color="red", edgecolors="white", linewidths=0.6, zorder=3)
        for x, y, s in zip(h, v, chain, strict=True):
            ax.annotate(short_name(s.name), (x, y), xytext=(6, 0), textcoords="offset points",
                        color="yellow", fontsize=10, fontweight="bold", va="center", zorder=4)
    fig.suptitle(title, fontsize=10)
    return fig


def require_vertebrae(passport: Passport, passport_path: Path) -> None:
    """InputError (before the scan is read) when the passport has no vertebra."""
    if not any(s.name.startswith("vertebrae_") for s in spine_chain(passport.structures)):
        raise InputError(passport_path, "passport has no vertebrae (no structure named vertebrae_*)")


def picture(passport: Passport, passport_path: Path, scan_path: Path, scan: DisplayScan):
    """The spine figure with its title (which files, which vertebrae, which weights)."""
    chain = spine_chain(passport.structures)
    names = ", ".join(short_name(s.name) for s in chain)
    return draw_spine(chain, scan, f"{passport_path.name}: spine ({names}) on {scan_path.name}"
                      + weights_caption(passport))


def build_parser() -> argparse.ArgumentParser:
    """The command line (common.cli.passport_figure.cli_parser: one-line errors, exit 2)."""
    return cli_parser(__doc__, OUT_SUFFIX)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_picture(args, OUT_SUFFIX, picture, check=require_vertebrae)


if __name__ == "__main__":
    sys.exit(run_script(main))
