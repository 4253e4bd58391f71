"""SIGTERM as a clean exit: SystemExit in this process, the default disposition again in forked children."""
from __future__ import annotations

import os
import signal

_FORK_HOOK_INSTALLED = False


def _default_sigterm_in_child() -> None:
    """After a fork: SIGTERM kills again. A Python-level handler only runs when the interpreter regains
    control, so a forked pool worker blocked in sem_wait would swallow the Pool.terminate() SIGTERM and
    hang its parent forever (seen in nnU-Net's pools)."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # forked from a non-main thread: no handler of ours was inherited there
        pass


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in this process only, so that atomic writes in progress remove their
    temporary files (a SIGKILL cannot be caught: then only a hidden .tmp-* file may remain, never a partial
    output). Forked children get the default disposition back (os.register_at_fork)."""
    global _FORK_HOOK_INSTALLED

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    if not _FORK_HOOK_INSTALLED:
        os.register_at_fork(after_in_child=_default_sigterm_in_child)
        _FORK_HOOK_INSTALLED = True
