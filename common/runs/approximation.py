"""An approximate run's own measurement of what it changes (issue 27, item 4): the margin analysis on a scan.

06 with ``--precision bf16`` runs this once, after its batch (so that no scan's timing or peak memory includes
it), on the first scan it segmented: the scan preprocessed as the pipeline does, then
common.inference.margins.margin_analysis of the run's approximate predictor against the exact float32
channels-last network on the scan's central tiles. The record goes into the result JSON as "approximation".
"""
from __future__ import annotations

import time
from pathlib import Path

from common.imaging.validation import load_scan
from common.inference.margins import margin_analysis
from common.inference.pipeline import model_input
from common.inference.precision import describe
from common.inference.preprocess import to_canonical_raw
from common.inference.run_config import RunConfig


def measure_margins(scan: Path, spec, cfg: RunConfig, approximate, max_tiles: int = 1) -> dict:
    """{"scan", "arithmetic", "reference", "seconds", **margin_analysis(...)} for ``scan`` with the run's
    ``approximate`` predictor (its ``tile_logits``) against a freshly built exact float32 predictor on the same
    threads. Raises what loading a bad scan raises."""
    from common.inference.torch_channels_last import ChannelsLastTorchPredictor

    t0 = time.perf_counter()
    vol, _ = load_scan(scan)
    data, _, _ = model_input(to_canonical_raw(vol.image), spec, order=cfg.segment.resample_order,
                             threads=cfg.segment.resample_threads)
    exact = ChannelsLastTorchPredictor(spec.build_network(), threads=cfg.torch_threads, precision="float32")
    figures = margin_analysis(data, exact, approximate, spec.patch_size, step=cfg.segment.tile_step,
                              max_tiles=max_tiles)
    return {"scan": str(scan), "arithmetic": describe(cfg.precision),
            "reference": "exact float32 channels-last network (06's exact mode), same threads",
            "seconds": time.perf_counter() - t0, **figures}


def margin_line(rec: dict) -> str:
    """The one-line summary 06 prints."""
    return (f"approximate ({rec['arithmetic']['precision']} network) vs exact on {rec['tiles']} tile(s) of "
            f"{Path(rec['scan']).name}: largest logit error {rec['max_abs_logit_error']:.3g} (logit differences "
            f"{rec['max_pair_error']:.3g}); voxels whose exact top-2 margin is below it: "
            f"{rec['fraction_margin_below_max_error']:.2%} ({rec['fraction_margin_below_max_pair_error']:.2%}); "
            f"labels flipped in those tiles: {rec['fraction_flipped']:.3%}")
