"""A batch's scans as tasks on a Dask cluster (dask.distributed): 06's batch and totalseg-fast's folder mode.

- ``open_client``: connect to a running scheduler (``tcp://host:8786`` or a scheduler file), or start a
  ``LocalCluster`` of N worker processes x T threads; every step has a time limit.
- ``PredictorPlugin``: a worker plugin that builds the predictor (ONNX Runtime session or PyTorch network,
  and the weights' provenance) once per worker process, when the worker starts or joins, and logs one
  ``ts-bench-session`` event per build (the client counts them). A worker runs one scan at a time with as
  many compute threads as it has Dask threads, so workers x threads = the cores used.
- ``run_tasks``: submit one task per scan (a module-level function, run on a worker with that worker's
  predictor), yield outcomes as they complete (tqdm progress on the client), record a worker death: the
  scheduler retries a scan whose worker died once on another worker (``allowed-failures`` = 1 on clusters we
  start), then the scan fails with one line. Each task start is logged as a ``ts-bench-start`` event, so
  the client can say which scans ran more than once and on which workers.

Outputs are written by the worker that computed them, atomically (common.core.atomic), to the shared output
folder; the client assembles the result JSON. Nothing here decides what a task does with a scan.
"""
from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from common.core.machine import usable_cores
from common.inference.run_config import RunConfig

PLUGIN_NAME = "ts-bench-predictor"
SESSION_EVENT = "ts-bench-session"
START_EVENT = "ts-bench-start"
ALLOWED_FAILURES = 1  # worker deaths a scan may see and still be retried: once, then it is recorded failed
CONNECT_TIMEOUT_S = 60
START_TIMEOUT_S = 180  # LocalCluster start, plugin set-up (imports + one session per worker)
CLOSE_TIMEOUT_S = 30


@dataclass(frozen=True)
class ModelRecipe:
    """What a worker needs to build its predictor: the run configuration (pickled to the worker as is), the
    weights choice ("auto"/"official"/"standin") and the base ONNX file (None for the PyTorch backend)."""

    config: RunConfig
    weights: str
    onnx: str | None


class PredictorPlugin(WorkerPlugin):
    """Dask worker plugin: one predictor per worker process, built in ``setup`` when the worker starts or joins
    (a worker restarted by its nanny is a new process and builds its own)."""

    name = PLUGIN_NAME

    def __init__(self, recipe: ModelRecipe):
        self.recipe = recipe
        self.spec = self.predictor = self.cfg = None
        self.lock = None

    def setup(self, worker) -> None:
        from common.core.streams import setup_console
        from common.inference.model_cache import prepare_model
        from common.inference.predictor_factory import build_predictor

        setup_console()  # a worker process prints too: same non-UTF-8 console safety as the scripts
        t0 = time.perf_counter()
        cfg = copy.deepcopy(self.recipe.config)  # the worker's threads are set below, not the caller's
        threads = worker.state.nthreads
        cfg.ort.intra_op_threads = threads
        cfg.torch_threads = threads
        self.spec = prepare_model(self.recipe.weights, log=lambda m: None)
        self.predictor = build_predictor(cfg, self.spec, Path(self.recipe.onnx) if self.recipe.onnx else None)
        self.cfg = cfg
        self.lock = threading.Lock()  # one scan at a time per worker: its threads all go to that scan
        worker.log_event(SESSION_EVENT, {"worker": worker.address, "host": socket.gethostname(), "pid": os.getpid(),
                                         "nthreads": threads, "build_s": time.perf_counter() - t0})

    def teardown(self, worker) -> None:
        self.predictor = None


def run_on_worker(fn: Callable, scan_id: str, *args: Any) -> tuple[Any, dict]:
    """Executed on a worker: ``fn(*args, spec, predictor, cfg)`` with the worker's predictor, one scan at a time.
    Returns (fn's result, {"worker", "host", "pid", "seconds"})."""
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins[PLUGIN_NAME]
    with plugin.lock:
        worker.log_event(START_EVENT, {"scan_id": scan_id, "worker": worker.address, "pid": os.getpid()})
        t0 = time.perf_counter()
        out = fn(*args, plugin.spec, plugin.predictor, plugin.cfg)
        return out, {"worker": worker.address, "host": socket.gethostname(), "pid": os.getpid(),
                     "seconds": time.perf_counter() - t0}


@dataclass(frozen=True)
class ClusterTarget:
    """Where a batch runs: a running scheduler (``scheduler``: its address, tcp://host:8786, or its scheduler
    file), or a LocalCluster started here of ``workers`` processes x ``threads`` (default: cores // workers)."""

    scheduler: str | None = None
    workers: int | None = None
    threads: int | None = None


@dataclass
class ClusterRun:
    """The client side of one batch: what the result JSON's machine record says about the cluster."""

    client: Any
    kind: str  # "local" or "scheduler"
    address: str
    dashboard: str | None = None
    start_s: float | None = None  # starting/joining the cluster and building every worker's session
    per_worker: dict[str, dict] = field(default_factory=dict)

    def worker_seconds(self, info: dict) -> None:
        w = self.per_worker.setdefault(info["worker"], {"host": info["host"], "pid": info["pid"], "scans": 0,
                                                       "busy_s": 0.0})
        w["scans"] += 1
        w["busy_s"] += info["seconds"]

    def events(self, topic: str) -> list[dict]:
        try:
            return [msg for _, msg in self.client.get_events(topic)]
        except Exception:  # the scheduler is gone: no events to report
            return []

    def starts_by_scan(self) -> dict[str, list[str]]:
        """scan id -> the workers that started it, in order (more than one: it was retried)."""
        out: dict[str, list[str]] = {}
        for e in self.events(START_EVENT):
            out.setdefault(e["scan_id"], []).append(e["worker"])
        return out

    def record(self) -> dict:
        """The cluster part of the result's machine record: workers, their hosts, sessions built, scans, busy s."""
        sessions = self.events(SESSION_EVENT)
        workers = {}
        for s in sessions:
            w = workers.setdefault(s["worker"], {"host": s["host"], "pid": s["pid"], "nthreads": s["nthreads"],
                                                 "sessions_built": 0, "session_build_s": s["build_s"],
                                                 "scans": 0, "busy_s": 0.0})
            w["sessions_built"] += 1
        for addr, w in self.per_worker.items():
            workers.setdefault(addr, {"host": w["host"], "pid": w["pid"], "nthreads": None, "sessions_built": 0,
                                      "session_build_s": None, "scans": 0, "busy_s": 0.0})
            workers[addr]["scans"] = w["scans"]
            workers[addr]["busy_s"] = round(w["busy_s"], 3)
        return {"kind": self.kind, "scheduler": self.address, "dashboard": self.dashboard, "start_s": self.start_s,
                "workers": [{"address": a, **w} for a, w in sorted(workers.items())],
                "cores": sum(w["nthreads"] or 0 for w in workers.values())}


@contextmanager
def open_client(target: ClusterTarget, recipe: ModelRecipe, log: Callable[[str], None]) -> Iterator[ClusterRun]:
    """A Dask client with the predictor plugin registered on every worker (and on workers that join later).
    Raises RuntimeError (one line) when the scheduler cannot be reached or a worker cannot build its model."""
    import dask
    from distributed import Client, LocalCluster

    cluster = None
    t0 = time.perf_counter()
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        try:
            if target.workers:
                threads = target.threads or max(1, usable_cores() // target.workers)
                cluster = _within(START_TIMEOUT_S, "start the local Dask cluster", LocalCluster,
                                  n_workers=target.workers, threads_per_worker=threads, processes=True,
                                  dashboard_address=":0", silence_logs=logging.ERROR)
                client = Client(cluster, timeout=CONNECT_TIMEOUT_S)
                kind = "local"
            else:
                is_file = Path(target.scheduler).is_file()
                client = Client(scheduler_file=target.scheduler, timeout=CONNECT_TIMEOUT_S) if is_file else \
                    Client(target.scheduler, timeout=CONNECT_TIMEOUT_S)
                kind = "scheduler"
        except (OSError, TimeoutError, ValueError) as exc:
            if cluster is not None:
                cluster.close(timeout=CLOSE_TIMEOUT_S)
            where = f"--scheduler {target.scheduler}" if target.scheduler else f"--workers {target.workers}"
            raise RuntimeError(f"{where}: cannot start or reach the Dask cluster ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]})") from exc
    try:
        run = ClusterRun(client, kind, client.scheduler.address)
        try:
            run.dashboard = client.dashboard_link if "dashboard" in client.scheduler_info().get("services", {}) \
                else None
        except Exception:
            run.dashboard = None
        n = len(client.scheduler_info().get("workers", {}))
        log(f"Dask cluster: {kind} scheduler {run.address}, {n} worker(s)"
            + (f"; dashboard {run.dashboard}" if run.dashboard else ""))
        _register(client, recipe)
        run.start_s = time.perf_counter() - t0
        yield run
    finally:
        try:
            client.close(timeout=CLOSE_TIMEOUT_S)
        finally:
            if cluster is not None:
                cluster.close(timeout=CLOSE_TIMEOUT_S)


def _within(seconds: float, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a helper thread, given up (TimeoutError, one line) after ``seconds``: Dask's
    blocking calls have no time limit of their own. Exceptions of ``fn`` are re-raised."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=seconds)
    except FutureTimeout as exc:
        raise TimeoutError(f"could not {what} within {seconds:.0f} s") from exc
    finally:
        pool.shutdown(wait=False)


def _register(client, recipe: ModelRecipe) -> None:
    """Register the predictor plugin (set up now on every worker, within START_TIMEOUT_S); a worker that cannot
    build its model is one line (RuntimeError)."""
    try:
        _within(START_TIMEOUT_S, "build the model on the Dask workers", client.register_plugin,
                PredictorPlugin(recipe), name=PLUGIN_NAME)
    except Exception as exc:  # the worker's own exception, re-raised by Dask on the client
        raise RuntimeError(f"a Dask worker could not build the model ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:300]})") from exc


@dataclass
class TaskOutcome:
    """One scan's task: ``value`` (what the task function returned) or ``error`` (one line: the worker died
    twice, the task was cancelled, or no scan finished in time); ``attempts``: workers that started it."""

    scan: Path
    scan_id: str
    value: Any = None
    error: str | None = None
    attempts: list[str] = field(default_factory=list)


def run_tasks(run: ClusterRun, fn: Callable, items: list[tuple[Path, str, tuple]], *, scan_timeout_s: float,
              desc: str, quiet: bool = False) -> Iterator[TaskOutcome]:
    """Submit ``fn(scan, scan_id, *extra, spec, predictor, cfg)`` for each (scan, scan_id, extra) and yield a
    TaskOutcome per scan as each completes (progress bar on stderr). Ctrl-C (KeyboardInterrupt) cancels the
    tasks not yet finished and is re-raised. When no task finishes for ``scan_timeout_s`` seconds the rest
    are cancelled and yielded with an error."""
    from distributed import wait
    from distributed.client import FutureCancelledError, FuturesCancelledError
    from distributed.scheduler import KilledWorker
    from tqdm import tqdm

    client = run.client
    futures = {}
    for scan, scan_id, extra in items:
        fut = client.submit(run_on_worker, fn, scan_id, scan, scan_id, *extra, pure=False,
                            key=f"scan-{scan_id}-{os.urandom(4).hex()}")
        futures[fut] = (scan, scan_id)
    pending = set(futures)
    bar = tqdm(total=len(futures), desc=desc, unit="scan", disable=quiet)
    try:
        while pending:
            try:
                wait(list(pending), timeout=scan_timeout_s, return_when="FIRST_COMPLETED")
                timed_out = False
            except TimeoutError:
                timed_out = True
            except FuturesCancelledError:
                timed_out = False  # each cancelled future is reported below with its own error
            done = {f for f in pending if f.status != "pending"}
            pending -= done
            if timed_out and not done:
                client.cancel(list(pending), force=True)
                for fut in pending:
                    scan, scan_id = futures[fut]
                    yield TaskOutcome(scan, scan_id, error=f"{scan}: no scan finished on the cluster within "
                                                           f"{scan_timeout_s:.0f} s (--scan-timeout); cancelled")
                pending = set()
                break
            starts = run.starts_by_scan()
            for fut in done:
                scan, scan_id = futures[fut]
                out = TaskOutcome(scan, scan_id, attempts=starts.get(scan_id, []))
                try:
                    out.value, info = fut.result()
                    run.worker_seconds(info)
                except KilledWorker:
                    out.error = (f"{scan}: the Dask workers segmenting it died ({max(len(out.attempts), 1)} "
                                 "attempt(s); killed or out of memory?); not retried again")
                except FutureCancelledError:
                    out.error = f"{scan}: cancelled on the cluster"
                except Exception as exc:  # the task function records its own errors; this is the cluster's
                    out.error = f"{scan}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                bar.update(1)
                yield out
    except BaseException:
        client.cancel(list(pending), force=True)
        raise
    finally:
        bar.close()
