"""Takes the README's picture of the web demo: serves the shipped model on 127.0.0.1, opens
the page in headless chromium (Debian's, with its chromedriver), generates one prompt and
saves a screenshot of the page.

    .venv/bin/python tools/demo_screenshot.py --out=docs/demo.png
"""

import time

from absl import app, flags

from imagen_jax import logs
from imagen_jax.demo import app as demo_app
from imagen_jax.demo import loading as demo_loading

flags.DEFINE_string("out", "docs/demo.png", "Where the screenshot goes.")
flags.DEFINE_string("prompt", "a red circle above a blue square", "The prompt typed.")
flags.DEFINE_integer("port", 7869, "Port of the demo server.")
flags.DEFINE_string("chromium", "/usr/bin/chromium", "The browser.")
flags.DEFINE_string("chromedriver", "/usr/bin/chromedriver", "Its driver.")


def main(argv):
    del argv
    logs.quiet_logs()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    f = flags.FLAGS
    models = demo_loading.load_models([])
    server = demo_app.launch(models, port=f.port, warm=False, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = f.chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1150")
    driver = webdriver.Chrome(service=Service(f.chromedriver), options=options)
    try:
        driver.get(f"http://127.0.0.1:{f.port}/")
        wait = WebDriverWait(driver, 900)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        box.send_keys(f.prompt)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#files a[href]")))
        time.sleep(2)  # the gallery's images load
        driver.save_screenshot(f.out)
        print(f"demo_screenshot: {f.out}")
    finally:
        driver.quit()
        server.close()


if __name__ == "__main__":
    app.run(main)
