"""The page in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by
Selenium loads the page from ``medvlp serve`` started on 127.0.0.1, uploads a VQA-RAD image, asks a question
and reads the answers and the heat-map from the page."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, SHARED_DATA

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no Chromium here: apt-get install -y chromium chromium-driver (Debian) to run the browser test")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(vqa_run, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "medvlp", "serve", str(vqa_run), "--host", "127.0.0.1",
                                    "--port", str(port), "precision=fp32"], stdout=log, stderr=subprocess.STDOUT,
                                   env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"medvlp serve exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("medvlp serve did not come up within 120 s")
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def vqa_rad_image() -> Path:
    folder = SHARED_DATA / "vqa_rad" / "VQA_RAD Image Folder"
    images = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not images:
        pytest.skip(f"no VQA-RAD images in {folder}")
    return images[0]


def test_page_answers_a_question_about_an_uploaded_image(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    image = vqa_rad_image()
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "task vqa" in d.find_element(By.ID, "model").text)
    upload = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].classList.remove('hidden')", upload)  # Selenium types into visible inputs
    upload.send_keys(str(image))
    browser.find_element(By.ID, "question").send_keys("Is there a lesion?")
    wait.until(ready.element_to_be_clickable((By.ID, "ask"))).click()
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answers tr.result"))
    assert len(rows) == 5
    answers = [row.find_element(By.CLASS_NAME, "name").text.split()[0] for row in rows]
    expected = httpx.post(f"{server}/v1/answer", files={"image": (image.name, image.read_bytes())},
                          data={"question": "Is there a lesion?"}, timeout=60).json()["answers"]
    assert answers == [a["answer"] for a in expected]
    assert browser.find_element(By.ID, "status").get_attribute("class") != "error"
    assert browser.find_element(By.ID, "legend").is_displayed()  # the heat-map was drawn
    canvas = browser.find_element(By.ID, "view")
    width = browser.execute_script("return arguments[0].width", canvas)
    from PIL import Image

    assert width == Image.open(image).width  # drawn at the original image's size
    browser.save_screenshot(str(tmp_path / "page.png"))
