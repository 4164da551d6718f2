"""``nag ui`` in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

The server is the installed ``nag ui`` command in a subprocess, on its default model: the
built-in tiny model shipped with the package (offline). The test types a prompt, clicks Generate
and waits for both images (unguided and NAG) and the gallery to show results.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    exe = Path(sys.executable).parent / "nag"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    log = tmp_path_factory.mktemp("log") / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "ui", "--port", str(port), "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"nag ui exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"nag ui did not come up: {log.read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_ui_generates_in_browser(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, 60)
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    assert "Normalized Attention Guidance" in browser.page_source
    assert not browser.find_elements(By.CSS_SELECTOR, "#nag-result img")  # nothing yet
    prompt.send_keys("a red circle")
    browser.find_element(By.CSS_SELECTOR, "#negative textarea").send_keys("blue")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()

    def loaded_image(selector: str):
        def check(driver):
            for img in driver.find_elements(By.CSS_SELECTOR, selector):
                if img.get_attribute("src") and driver.execute_script(
                        "return arguments[0].complete && arguments[0].naturalWidth > 0", img):
                    return img
            return False
        return check

    guided = WebDriverWait(browser, 120).until(loaded_image("#nag-result img"))
    unguided = wait.until(loaded_image("#unguided img"))
    assert browser.execute_script("return arguments[0].naturalWidth", guided) == 32
    assert guided.get_attribute("src") != unguided.get_attribute("src")
    wait.until(loaded_image("#gallery img"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2
