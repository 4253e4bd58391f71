"""The clinical app served for a real browser: ``streamlit run`` on a free localhost port, as a process group that
is always ended, and headless Chromium (Debian's chromium + chromium-driver) driven by selenium. Every wait has a
time limit."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "registration" / "clinical_app.py"
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 20
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)


def browser_problem() -> str | None:
    """Why the real-browser test cannot run here (one line), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements.txt)"
    if not any(shutil.which(b) for b in CHROMIUM):
        return "no Chromium here: apt-get install chromium chromium-driver (.ci/run does it when it can)"
    if not any(shutil.which(d) for d in DRIVER):
        return "no chromedriver here: apt-get install chromium-driver"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(app_args: list[str], tmpdir: Path, log: Path) -> Iterator[str]:
    """The app's URL while ``streamlit run`` serves it on 127.0.0.1 (its temporary folders under ``tmpdir``, its
    output in ``log``); stopped (SIGTERM, then SIGKILL of the group) on leaving."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--", *app_args]
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the app server exited ({proc.returncode}): {tail}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app server did not answer within {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> int | None:
    """End the server's process group: SIGTERM, then SIGKILL after STOP_TIMEOUT_S; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
    return proc.returncode


def chromium(width: int, height: int):
    """Headless system Chromium through Debian's chromedriver, with a ``width`` x ``height`` viewport."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    binary = next(shutil.which(b) for b in CHROMIUM if shutil.which(b))
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver_path = next(shutil.which(d) for d in DRIVER if shutil.which(d))
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    # --window-size sets the window; the page's viewport is what a laptop screen shows
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(width + (width - inner[0]), height + (height - inner[1]))
    return driver
