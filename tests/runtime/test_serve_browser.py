"""The `fmtl serve` page in a real browser (Debian's chromium and chromedriver, driven by selenium):
pick an image and see the bars, pick a broken file and see its error, and a model whose file name
is an HTML tag shows that name as text (no script runs). `make browser` installs the browser."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from onnx_fixtures import grey_model
from test_serve import ServerProcess, png

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE = "<img src=x onerror=alert(1)>"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver: run `make browser`", allow_module_level=True)

from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture()
def browser():
    profile = tempfile.mkdtemp(prefix="fmtl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_shows_bars_errors_and_a_hostile_model_name_as_text(tmp_path, browser):
    model = grey_model(tmp_path).rename(tmp_path / f"{HOSTILE}.onnx")
    good, broken = tmp_path / "shoe.png", tmp_path / "broken.png"
    good.write_bytes(png(np.full((28, 28), 200, np.uint8)))
    broken.write_bytes(b"this is not an image")
    server = ServerProcess([str(model)], tmp_path).start()
    try:
        browser.get(server.url + "/")
        assert browser.find_element(By.ID, "model").text == HOSTILE  # shown as text ...
        assert not browser.find_elements(By.CSS_SELECTOR, "h1 img, img[src=x]")  # ... not made an element
        assert HOSTILE in browser.title
        pick(browser, good)
        rows = WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#result .row"))
        labels = [row.find_element(By.CLASS_NAME, "label").text for row in rows]
        assert sorted(labels) == ["bright", "dark", "medium"]
        widths = [row.find_element(By.CLASS_NAME, "bar").size["width"] for row in rows]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0
        pick(browser, broken)
        error = WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "error").text)
        assert "not a readable image" in error and not browser.find_elements(By.CSS_SELECTOR, "#result .row")
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018  (the hostile name's script never ran)
    finally:
        server.stop()


def pick(browser, path: Path) -> None:
    """Choose a file in the page's file input, as a user's click on it would."""
    browser.find_element(By.ID, "file").send_keys(str(path))
