#!/usr/bin/env python
"""Draw an anatomical passport over axial, coronal and sagittal MIPs of its CT scan.

Each structure's centroid is a dot and its principal axes are line segments along the covariance
eigenvectors with half-length 2*sqrt(eigenvalue) mm, projected into each view. The ~15 largest
structures (by volume) get colours and a legend entry; the others are drawn in white.

    python 08_visualize_passport.py --passport out/example_passport.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from common.cli.args import run_script
from common.cli.passport_figure import cli_parser, run_picture
from common.records.passport import Passport, Structure
from common.reporting.plots_passport import VIEWS, DisplayScan, project, view_figure, weights_caption
from common.reporting.plots_passport import default_out as _default_out

OUT_SUFFIX = "_passport"
N_LEGEND = 15
AXIS_SIGMAS = 2.0  # half-length of drawn principal axes, in standard deviations


def default_out(passport_path: str | Path) -> Path:
    """<passport folder>/<passport stem>_passport.png"""
    return _default_out(passport_path, OUT_SUFFIX)


def axis_segments(structure: Structure, sigmas: float = AXIS_SIGMAS) -> np.ndarray:
    """(3, 2, 3) world-mm end points of the principal axes: centroid -/+ sigmas*sqrt(eigenvalue)*eigenvector."""
    centroid = structure.centroid_mm
    vectors = structure.eigenvectors  # columns
    half = sigmas * np.sqrt(np.clip(structure.eigenvalues_mm2, 0.0, None))
    offsets = (vectors * half[None, :]).T  # (3 axes, 3 world coords)
    return np.stack([centroid - offsets, centroid + offsets], axis=1)


def draw_passport(passport: Passport, scan: DisplayScan, title: str):
    """Figure with the three MIP views and every structure's centroid and principal axes."""
    views = [VIEWS["axial"], VIEWS["coronal"], VIEWS["sagittal"]]
    fig, axes = view_figure(scan, views, extra_width_in=2.0)
    structures = sorted(passport.structures, key=lambda s: -s.volume_mm3)
    palette = colormaps["tab20"]
    handles = {}
    for rank, s in enumerate(structures):
        named = rank < N_LEGEND
        colour = palette(rank % 20) if named else (1.0, 1.0, 1.0, 0.8)
        centre = scan.to_display(s.centroid_mm)
        segments = scan.to_display(axis_segments(s).reshape(-1, 3)).reshape(3, 2, 3)
        for ax, view in zip(axes, views, strict=True):
            for seg in segments:
                h, v = project(seg, view)
                ax.plot(h, v, color=colour, linewidth=1.4 if named else 0.6, alpha=0.9 if named else 0.45)
            h, v = project(centre, view)
            dot = ax.scatter(h, v, s=28 if named else 10, color=colour, edgecolors="black", linewidths=0.5,
                             zorder=3, label=s.name)
            if named and ax is axes[0]:
                handles[s.name] = dot
    n_other = max(len(structures) - N_LEGEND, 0)
    labels = list(handles)
    if n_other:
        other = axes[0].scatter([], [], s=10, color="white", edgecolors="black", linewidths=0.5)
        handles["others"] = other
        labels.append(f"{n_other} smaller structures")
    fig.legend(list(handles.values()), labels, loc="outside right center", fontsize=8, frameon=False,
               title=f"largest {min(N_LEGEND, len(structures))} by volume", title_fontsize=8)
    fig.suptitle(title + weights_caption(passport), fontsize=10)
    return fig


def picture(passport: Passport, passport_path: Path, scan_path: Path, scan: DisplayScan):
    """The passport figure with its title (which files, grid, how the axes are drawn)."""
    grid = passport.grid
    title = (f"{passport_path.name}: {len(passport.structures)} structures "
             f"({grid.resolution} grid {'x'.join(str(n) for n in grid.shape)}) on {scan_path.name}; "
             f"axes = ±{AXIS_SIGMAS:g}·sqrt(eigenvalue) mm")
    return draw_passport(passport, scan, title)


def build_parser() -> argparse.ArgumentParser:
    """The command line (common.cli.passport_figure.cli_parser: one-line errors, exit 2)."""
    return cli_parser(__doc__, OUT_SUFFIX)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_picture(args, OUT_SUFFIX, picture)


if __name__ == "__main__":
    sys.exit(run_script(main))
