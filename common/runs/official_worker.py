"""The child side of common.runs.official: a fresh Python process that runs the official TotalSegmentator.

Started by ``common.runs.official.OfficialRunner`` as ``python -m common.runs.official_worker`` in a new process group
(never forked from the suite's process, so it inherits none of its signal handlers, threads or locks).
It reads one JSON request per line on stdin and answers one JSON line on the protocol pipe (the original
stdout; everything the official tool prints goes to stderr). The parent enforces the time limit by killing
the whole process group, nnU-Net's forked pool workers included.

Inside this process only, the official tool is kept off the network and off the user's files:
- ``TOTALSEG_WEIGHTS_PATH`` (set by the parent) points at the weights root that holds the Task 297 folder
  chosen by common.inference.weights (the user's official weights, or the project's stand-in);
- ``TOTALSEG_HOME_DIR`` (set by the parent) is the project's own TotalSegmentator home, whose config.json
  has usage statistics off: the official tool's config writes (prediction counter, disclaimer flag) land
  there, never in the user's ~/.totalsegmentator;
- its weight download/clean-up step is replaced by a check that the folder exists (the parent made sure).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# A test hook, documented in tests/test_official_isolation.py: a scan whose file name contains this text
# makes the worker sleep instead of segmenting, as a stuck official call would.
INJECT_HANG_ENV = "TS_BENCH_INJECT_OFFICIAL_HANG"


def _prepare_official() -> Any:
    """Import the official python API with its network and download steps disabled; return its entry point."""
    from common.runs.official import register_trainer_class

    register_trainer_class()
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no monitor thread before nnU-Net forks its pools
    from totalsegmentator import config as ts_config
    from totalsegmentator import python_api

    def no_download(task_id):  # the parent ensured the weights; never download or delete weights here
        from common.inference.weights import DATASET_NAME, TASK_ID

        if task_id != TASK_ID or not (Path(ts_config.get_weights_dir()) / DATASET_NAME).is_dir():
            raise RuntimeError(f"official weights for task {task_id} are not in {ts_config.get_weights_dir()}")

    python_api.download_pretrained_weights = no_download
    python_api.send_usage_stats = lambda *a, **k: None
    return python_api.totalsegmentator


def _peak_rss_bytes() -> dict[str, int]:
    """Peak resident memory (bytes) of this process and of its waited-for children (nnU-Net's workers)."""
    kb = 1024  # Linux reports ru_maxrss in KiB
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """Further official keyword arguments from JSON: the paths the official CLI gives as Path objects."""
    return {k: Path(v) if k == "save_probabilities" and v is not None else v for k, v in options.items()}


def _handle(req: dict[str, Any], totalsegmentator) -> dict[str, Any]:
    hang = os.environ.get(INJECT_HANG_ENV)
    if hang and hang in Path(req["input"]).name:
        time.sleep(10 ** 6)
    t0 = time.perf_counter()
    totalsegmentator(req["input"], req["output"], ml=bool(req.get("ml", True)), fast=True, task="total",
                     device=req.get("device", "cpu"), quiet=True, nr_thr_resamp=int(req.get("nr_thr_resamp", 1)),
                     nr_thr_saving=int(req.get("nr_thr_saving", 6)), statistics=bool(req.get("statistics", False)),
                     roi_subset=req.get("roi_subset"), preview=bool(req.get("preview", False)),
                     **_options(req.get("options", {})))
    return {"ok": True, "total_s": time.perf_counter() - t0, "peak_rss_bytes": _peak_rss_bytes()}


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the official tool's prints go to stderr (the parent's log), not into the protocol
    sys.stdout = sys.stderr

    def answer(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    try:
        totalsegmentator = _prepare_official()
    except Exception as exc:
        answer({"ok": False, "error": f"cannot start the official TotalSegmentator: {type(exc).__name__}: {exc}"})
        return 1
    answer({"ok": True, "ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            answer(_handle(req, totalsegmentator))
        except Exception as exc:  # reported to the parent as one line; the worker stays usable
            traceback.print_exc()
            answer({"ok": False, "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
