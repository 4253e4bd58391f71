"""The cluster options of 06 and totalseg-fast (no Dask import: the single-process path stays as light).

See common.runs.cluster for what they do.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from common.core.machine import usable_cores

if TYPE_CHECKING:
    from common.runs.cluster import ClusterTarget


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """--scheduler / --workers / --threads / --scan-timeout (without them the batch runs in this process)."""
    from common.cli.args import positive_int

    g = p.add_argument_group("cluster (optional; without these options the batch runs in this process)")
    g.add_argument("--scheduler", metavar="ADDRESS|FILE",
                   help="run the scans on a running Dask scheduler: its address (tcp://host:8786) or its scheduler "
                        "file (dask scheduler --scheduler-file F); workers need this project installed and the "
                        "inputs, model and --out on a shared file system")
    g.add_argument("--workers", type=positive_int, metavar="N",
                   help="start a local Dask cluster of N worker processes (each builds its model session once)")
    g.add_argument("--threads", type=positive_int, metavar="T",
                   help="compute threads per local worker (default: cores // N; N x T must not exceed the cores)")
    g.add_argument("--scan-timeout", type=positive_int, default=3600, metavar="S",
                   help="on a cluster: give up when no scan finishes for S seconds; the scans left are recorded "
                        "as failed (default: %(default)s)")


def cluster_problem(args: argparse.Namespace) -> str | None:
    """Why the cluster options cannot be used together, or None."""
    if args.scheduler and (args.workers or args.threads):
        return "--scheduler connects to a running cluster; --workers/--threads start a local one: give one of them"
    if args.threads and not args.workers:
        return "--threads needs --workers (threads of a running cluster's workers are set where they start)"
    if args.workers:
        cores = usable_cores()
        threads = args.threads or max(1, cores // args.workers)
        if args.workers * threads > cores:
            return (f"--workers {args.workers} x --threads {threads} = {args.workers * threads} threads on "
                    f"{cores} cores; use at most {cores} in all")
    return None


def cluster_target(args: argparse.Namespace) -> ClusterTarget:
    """The cluster the parsed --scheduler / --workers / --threads name (checked by cluster_problem first)."""
    from common.runs.cluster import ClusterTarget  # Dask is imported only when a cluster is asked for

    return ClusterTarget(scheduler=args.scheduler, workers=args.workers, threads=args.threads)


def wants_cluster(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "scheduler", None) or getattr(args, "workers", None))
