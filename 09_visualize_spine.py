#!/usr/bin/env python
"""Draw the vertebrae centroids of an anatomical passport as a labelled chain over coronal and sagittal MIPs.

Vertebrae are the structures named "vertebrae_<C|T|L|S><n>", ordered anatomically C1..C7, T1..T12,
L1..L5, S1, followed by "sacrum" when present. Exits with code 2 if the passport has no vertebrae.

    python 09_visualize_spine.py --passport out/example_passport.json
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from common.errors import InputError
from common.passport import load_passport
from common.plots_passport import (
    VIEWS,
    DisplayScan,
    cli_parser,
    load_display_scan,
    project,
    save_png,
    scan_path_for,
    view_figure,
    weights_caption,
)
from common.plots_passport import default_out as _default_out

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


def spine_chain(passport: dict) -> list[dict]:
    """Vertebrae (and sacrum) structures in anatomical order, cranial to caudal."""
    spine = [s for s in passport["structures"] if spine_key(s["name"]) is not None]
    return sorted(spine, key=lambda s: spine_key(s["name"]))


def short_name(name: str) -> str:
    """'vertebrae_L1' -> 'L1'; other names unchanged."""
    return name.removeprefix("vertebrae_")


def draw_spine(chain: list[dict], scan: DisplayScan, title: str):
    """Figure with coronal and sagittal MIPs and the centroid chain with text labels."""
    views = [VIEWS["coronal"], VIEWS["sagittal"]]
    fig, axes = view_figure(scan, views, height_in=7.0, max_width_in=14.0)
    centres = scan.to_display(np.array([s["centroid_mm"] for s in chain]))
    for ax, view in zip(axes, views, strict=True):
        h, v = project(centres, view)
        ax.plot(h, v, "-", color="orange", linewidth=1.5, zorder=2)
        ax.scatter(h, v, s=30, color="red", edgecolors="white", linewidths=0.6, zorder=3)
        for x, y, s in zip(h, v, chain, strict=True):
            ax.annotate(short_name(s["name"]), (x, y), xytext=(6, 0), textcoords="offset points",
                        color="yellow", fontsize=10, fontweight="bold", va="center", zorder=4)
    fig.suptitle(title, fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser(__doc__, OUT_SUFFIX)
    args = parser.parse_args(argv)
    try:
        passport = load_passport(args.passport)
        chain = spine_chain(passport)
        if not any(s["name"].startswith("vertebrae_") for s in chain):
            raise InputError(args.passport, "passport has no vertebrae (no structure named vertebrae_*)")
        scan_path = scan_path_for(passport, args.passport, args.scan)
        scan = load_display_scan(scan_path)
        out = Path(args.out) if args.out else default_out(args.passport)
        names = ", ".join(short_name(s["name"]) for s in chain)
        fig = draw_spine(chain, scan, f"{Path(args.passport).name}: spine ({names}) on {scan_path.name}"
                         + weights_caption(passport))
        save_png(fig, out)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
