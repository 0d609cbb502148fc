"""The demo in a real headless browser: Debian's chromium driven by selenium through the
system chromedriver (nothing is downloaded). The page loads, a prompt is typed, Generate is
clicked, the images appear, and the PNG the page offers for download carries the metadata
of the job that made it.

`tests/run.sh` installs the `chromium` and `chromium-driver` packages with apt where they
are missing; without them this test fails and says so (it does not skip)."""

import base64
import io
import json
import os
import shutil

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FETCH = """
const done = arguments[arguments.length - 1];
fetch(arguments[0]).then(r => r.arrayBuffer()).then(buf => {
  let s = ""; const b = new Uint8Array(buf);
  for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]);
  done(btoa(s));
}).catch(e => done("ERROR " + e));
"""


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, DRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(
            f"the browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} "
            "missing): apt-get install chromium chromium-driver (tests/run.sh does, as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def test_type_generate_download(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    model, _, port = server
    browser.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(browser, 300)
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    box.send_keys("a blue star")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    link = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#files a[href]")))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery img")))
    data = browser.execute_async_script(FETCH, link.get_attribute("href"))
    assert not data.startswith("ERROR"), data
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        meta = json.loads(im.text["imagen_jax"])
    assert meta["prompt"] == "a blue star" and meta["job"]
    assert meta["stages"][0]["weights_sha256"] == model.loaded[0].weights_sha256
    info = browser.find_element(By.CSS_SELECTOR, "#info").text
    assert f"Seed {meta['seed']}" in info and "python sample.py" in info
