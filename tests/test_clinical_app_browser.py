"""The clinical app in a real browser: ``streamlit run`` serves it on localhost, headless Chromium (Debian's
chromium + chromium-driver, driven by selenium) opens it and goes through single-scan mode on the shared real CT
with its real label map (so that the overlay is anatomy), and saves screenshots at a laptop's 1366 x 768:

    benchmarks/clinical_app/single_scan.png        what the screen shows after loading (generated, not in git)
    benchmarks/clinical_app/single_scan_page.png   the whole page

Closing the browser ends the session: its temporary folder is removed. Skipped, with the reason, where Chromium or
its driver is missing (.ci/run installs them when it can).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from helpers.app_server import ROOT, app_server, browser_problem, chromium

SHOTS = ROOT / "benchmarks" / "clinical_app"
WIDTH, HEIGHT = 1366, 768
WAIT_S = 120


@pytest.fixture(scope="module")
def data(tmp_path_factory, example_ct_sm, example_seg_fast):
    folder = tmp_path_factory.mktemp("browser_data")
    shutil.copyfile(example_ct_sm, folder / "example_ct_sm.nii.gz")
    shutil.copyfile(example_seg_fast, folder / "example_ct_sm_seg.nii.gz")  # the official fast model's labels
    return folder


def _sessions(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob("ts-clinical-app-*/session-*"))


def test_single_scan_mode_in_chromium(data, tmp_path, standin_home):
    problem = browser_problem()
    if problem:
        pytest.skip(problem)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    SHOTS.mkdir(parents=True, exist_ok=True)
    tmpdir = tmp_path / "server_tmp"
    tmpdir.mkdir()
    args = ["--weights", "standin", "--data", str(data), "--out", str(tmp_path / "out06")]
    with app_server(args, tmpdir, tmp_path / "server.log") as url:
        driver = chromium(WIDTH, HEIGHT)
        try:
            wait = WebDriverWait(driver, WAIT_S)
            driver.get(f"{url}/?mode=single&single=example_ct_sm&single_seg=example_ct_sm_seg.nii.gz&structure=liver")
            load = wait.until(ec.element_to_be_clickable(
                (By.XPATH, "//button[.//p[normalize-space()='Load segmentation']]")))
            banner = driver.find_element(By.XPATH, "//*[contains(normalize-space(), 'Stand-in weights.')]")
            assert banner.is_displayed()
            assert len(_sessions(tmpdir)) == 1  # this browser session's folder
            load.click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img")) >= 3
                       and d.find_elements(By.CSS_SELECTOR, "[data-testid='stDataFrame']"))
            time.sleep(1.5)  # the last images paint
            page = driver.find_element(By.TAG_NAME, "body").text
            assert "your label map example_ct_sm_seg.nii.gz (40 structures)" in page
            assert "Traceback" not in page
            images = driver.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img")
            boxes = [i.rect for i in images[:3]]
            fits = all(b["x"] >= 0 and b["x"] + b["width"] <= WIDTH and b["y"] >= 0 and b["y"] + b["height"] <= HEIGHT
                       and b["width"] > 200 for b in boxes)
            assert fits, f"the three planes are not all on a {WIDTH} x {HEIGHT} screen: {boxes}"
            assert driver.execute_script("return document.documentElement.scrollWidth") <= WIDTH  # no sideways scroll
            driver.save_screenshot(str(SHOTS / "single_scan.png"))
            height = driver.execute_script(
                "const m = document.querySelector('[data-testid=\"stMain\"]') || document.body;"
                "return Math.max(m.scrollHeight, document.body.scrollHeight)")
            driver.set_window_size(WIDTH, min(int(height) + 200, 4000))
            time.sleep(1.0)
            driver.save_screenshot(str(SHOTS / "single_scan_page.png"))
        finally:
            driver.quit()
        deadline = time.monotonic() + 30  # the session ends with the browser: its folder goes
        while _sessions(tmpdir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _sessions(tmpdir), "the session's temporary folder outlived the session"
    assert (SHOTS / "single_scan.png").stat().st_size > 10_000
