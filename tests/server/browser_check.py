"""The web page of `sdrs serve` in headless Chromium: generate an image through the form and check
that the screenshot shows it.

Usage: browser_check.py SDRS_BINARY TINY_MODEL_FOLDER SCREENSHOT_PNG. Exits non-zero on failure.
"""

import base64
import io
import subprocess
import sys
import threading

from PIL import Image, ImageChops, ImageStat
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

SDRS, MODEL, SCREENSHOT = sys.argv[1], sys.argv[2], sys.argv[3]

process = subprocess.Popen(
    [SDRS, "serve", "-m", f"tiny={MODEL}", "--port", "0", "--device", "cpu", "--dtype", "f32"],
    stderr=subprocess.PIPE, text=True)
address = None
for line in process.stderr:
    if line.startswith("listening on "):
        address = line.strip().removeprefix("listening on ")
        break
if address is None:
    raise SystemExit(f"sdrs serve did not start (exit {process.wait()})")
threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()

options = webdriver.ChromeOptions()
for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--window-size=1200,1400"]:
    options.add_argument(flag)
options.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(address + "/")
    WebDriverWait(driver, 30).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 1)
    for field, value in [("prompt", "a lighthouse at dusk"), ("steps", "2"), ("width", "64"),
                         ("height", "64"), ("seed", "7")]:
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "generate").click()
    image = WebDriverWait(driver, 120).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#images img.result")))
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.querySelector('#images img.result').complete"))
    status = driver.find_element(By.ID, "status").text
    parameters = driver.find_element(By.ID, "parameters").text
    if "seed 7" not in status or "Seed: 7" not in parameters:
        raise SystemExit(f"FAILED: the page says {status!r} / {parameters!r}")
    print(f"ok: the page generated an image ({status})")
    driver.save_screenshot(SCREENSHOT)
    # The screenshot, where the image is, against the image itself (drawn 4x, pixelated).
    served = Image.open(io.BytesIO(base64.b64decode(
        image.get_attribute("src").split(",", 1)[1]))).convert("RGB")
    rect = image.rect
    shot = Image.open(SCREENSHOT).convert("RGB")
    border = 1
    box = (int(rect["x"]) + border, int(rect["y"]) + border,
           int(rect["x"] + rect["width"]) - border, int(rect["y"] + rect["height"]) - border)
    shown = shot.crop(box).resize(served.size, Image.BOX)
    difference = sum(ImageStat.Stat(ImageChops.difference(shown, served)).mean) / 3
    spread = sum(ImageStat.Stat(shown).stddev) / 3
    print(f"screenshot vs image: mean difference {difference:.1f}/255, spread {spread:.1f}")
    if difference > 12 or spread < 1:
        raise SystemExit("FAILED: the screenshot does not show the generated image")
    print(f"ok: the screenshot ({SCREENSHOT}) shows the generated image")
finally:
    driver.quit()
    process.kill()
    process.wait()
