"""--report: index.html with a card per image and the failures; safe against HTML in file names; checked in a
real headless browser (Debian's chromium + chromium-driver through selenium)."""

from __future__ import annotations

import io
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

from tests.runtime.test_cli import write_good

HOSTILE = "<script>alert(1)<script> & \"q\" 'x' #1 %20 ?q"  # a legal file name full of HTML and URL syntax


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]


@pytest.fixture(scope="module")
def report(tiny_artifacts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    imgs = write_good(tmp / "in", 2)
    hostile = tmp / "in" / f"{HOSTILE}.png"
    shutil.copy(imgs[0], hostile)
    (tmp / "in" / "broken.png").write_bytes(b"not a picture")
    out = tmp / "out"
    from runtime.explain import main

    code = main([str(tmp / "in"), "--artifacts", str(tiny_artifacts.out_dir), "--out", str(out), "--report",
                 "--top-p", "3", "--quiet"])
    assert code == 1  # broken.png
    return out


def test_report_lists_every_image_and_failure(report):
    page = (report / "index.html").read_text(encoding="utf-8")
    p = Collect()
    p.feed(page)
    assert page.count("<section class=card>") == 3
    assert "3 explained, 1 failed" in page and "broken.png" in page and "not an image" in page
    assert "script" not in p.tags
    assert "&lt;script&gt;alert(1)&lt;script&gt; &amp; &quot;q&quot; &#x27;x&#x27;" in page  # text, not markup
    assert all(not re.match(r"^[a-z]+:", u) and not u.startswith("/") for u in p.urls), p.urls  # relative only
    for u in p.urls:
        from urllib.parse import unquote

        assert (report / unquote(u)).is_file(), u
    assert "explained variance" in page and "top-5 class" in page and "timings" in page


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name), shutil.which("chromedriver")
    return None, None


def test_report_in_a_headless_browser(report):
    binary, driver = _browser()
    if binary is None:
        pytest.skip("no chromium binary (scripts/setup.sh installs Debian's chromium and chromium-driver)")
    if driver is None:
        pytest.skip("chromium is installed but chromedriver is not (apt-get install chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        opts.add_argument(a)
    browser = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    try:
        browser.get((report / "index.html").resolve().as_uri())
        assert browser.title.startswith("decomcam report")
        state = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert len(state) == 6  # overlay + components for each of the 3 cards
        assert all(complete and width > 0 for _, complete, width in state), state
        assert browser.execute_script("return document.querySelectorAll('script').length") == 0
        text = browser.execute_script("return document.body.innerText")
        assert HOSTILE in text and "3 explained, 1 failed" in text
        png = browser.get_screenshot_as_png()
    finally:
        browser.quit()
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert shot.shape[0] > 100 and shot.shape[1] > 100
    colours = len(np.unique(shot.reshape(-1, 3), axis=0))
    assert shot.std() > 10 and colours > 200, (shot.std(), colours)  # pictures, not a blank page
