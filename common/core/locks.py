"""One run at a time per scan in an output folder: two 06 runs on the same --out share the work.

A lock file per scan id in ``<out>/.locks/`` (filelock: an OS advisory lock, released by the kernel when its
process dies, so a killed run never leaves a stale claim). The lock files themselves stay (empty, hidden):
removing a lock file while another process may open it would let two processes hold "the" lock.
"""
from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_DIR = ".locks"


class ScanLock:
    """``with ScanLock(out_dir, scan_id) as lock:`` — ``lock.acquired`` is False (at once, no waiting) when
    another process holds the scan; ``lock.holder`` then says who, as far as known."""

    def __init__(self, out_dir: str | Path, scan_id: str, label: str | None = None):
        self.path = Path(out_dir) / LOCK_DIR / f"{scan_id}.lock"
        self.label = label  # who this is, for the other run's message (e.g. the command)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path), timeout=0)
        self.acquired = False
        self.holder = "another run"
        # set on acquiring: the process named by a .pid file left behind, i.e. one that held this scan and died
        # without releasing it (killed, out of memory): its work on the scan was interrupted
        self.died_holder: str | None = None

    def __enter__(self) -> ScanLock:
        try:
            self._lock.acquire()
        except Timeout:
            try:
                pid = self.path.with_suffix(".pid").read_text(encoding="utf-8").strip()
                self.holder = f"process {pid}" if pid else self.holder
            except OSError:
                pass
            return self
        self.acquired = True
        pid_file = self.path.with_suffix(".pid")
        try:  # who holds it, for the other run's message (best effort, not part of the lock)
            if pid_file.exists():  # removed on every release: its holder died holding the scan
                self.died_holder = f"process {pid_file.read_text(encoding='utf-8').strip() or '?'}"
            pid_file.write_text(f"{os.getpid()}" + (f" ({self.label})" if self.label else ""), encoding="utf-8")
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.acquired:
            # removed while still holding the lock, so that it never removes the next holder's file
            self.path.with_suffix(".pid").unlink(missing_ok=True)
            self._lock.release()
            self.acquired = False
