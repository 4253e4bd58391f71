"""The benchmark loop shared by 03, 04 and 05: warm-up (not counted), N timed repeats, one record per scan."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import tqdm as _tqdm
from tqdm import tqdm

from common.errors import InputError
from common.results import add_repeat, finalize_scan, mark_failed, new_scan_record
from common.validation import load_scan

_tqdm.tqdm.monitor_interval = 0  # no monitor thread: the official tool forks (see common/official.py)

# run(scan path, mask path or None) -> (total seconds, stage seconds, labels array or None)
RunFn = Callable[[Path, Path | None], tuple[float, dict[str, float], Any]]


def benchmark_scan(scan: Path, run: RunFn, mask_path: Path, repeats: int, warmup: int = 1) -> dict:
    """Validate ``scan``, run it ``warmup`` times untimed, then ``repeats`` timed runs, each writing the mask.

    Returns a scan record of the shared result schema (status 'failed' with a one-line error on failure).
    """
    from common.runner import labels_present

    record = new_scan_record(scan, shape=[0, 0, 0], spacing_mm=[0, 0, 0], orientation="?")
    try:
        vol, warnings = load_scan(scan)  # bad input is reported before any timing
        record.update(shape=list(vol.shape[:3]), spacing_mm=list(vol.spacing[:3]), orientation=vol.orientation,
                      warnings=warnings)
        del vol
        for _ in range(warmup):
            run(scan, mask_path)
        labels = None
        for _ in range(repeats):  # every timed run writes its mask: saving is part of the job
            total, stages, labels = run(scan, mask_path)
            add_repeat(record, total, stages)
        record["mask"] = str(mask_path)
        if labels is not None:
            record["labels_present"] = labels_present(labels)
    except InputError as exc:
        mark_failed(record, exc)
    except Exception as exc:  # one bad scan must not stop the batch
        mark_failed(record, f"{scan}: {type(exc).__name__}: {exc}")
    return finalize_scan(record)


def benchmark_scans(scans: list[Path], run: RunFn, out_dir: Path, repeats: int, warmup: int = 1,
                    desc: str = "benchmark") -> list[dict]:
    from common.runner import mask_path_for

    records = []
    bar = tqdm(scans, desc=desc, unit="scan")
    for scan in bar:
        bar.set_postfix_str(scan.name)
        rec = benchmark_scan(scan, run, mask_path_for(out_dir, scan), repeats, warmup)
        if rec["status"] == "failed":
            tqdm.write(f"FAILED {rec['error']}")
        else:
            m = rec["median"]
            tqdm.write(f"{scan.name}: median {m['total_s']:.2f} s [{m['min_total_s']:.2f}–{m['max_total_s']:.2f}] "
                       f"over {m['n']} runs")
        records.append(rec)
    return records


def segment_runner(spec, predictor, options) -> RunFn:
    """RunFn for our pipeline: load + validate, segment, save (stage-timed by common.runner.run_scan)."""
    import numpy as np

    from common.runner import run_scan

    def run(scan: Path, mask_path: Path | None):
        r = run_scan(scan, spec, predictor, options, mask_path=mask_path)
        return r.total_s, r.stages, np.asanyarray(r.result.labels.dataobj)

    return run
