"""The app in a real browser: Playwright drives Debian's Chromium (never a downloaded browser).

Starts ``python app.py`` on a free port with a tiny backbone, uploads an image, clicks on it and
waits for the similarity overlay (its best match must be the clicked patch), opens a DICOM series and
moves its slice slider, paints one scribble per class, trains a head and checks that the prediction
appears. Screenshots go to ``test-artifacts/browser/`` (or ``$DINOAPP_TEST_ARTIFACTS``).
In CI (``CI=true``) a missing Chromium fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _need_browser():
    pytest.importorskip("gradio")
    if os.environ.get("CI") == "true":
        assert Path(CHROMIUM).exists(), "CI needs Debian's chromium for the browser test (.ci/run installs it)"
        import playwright  # noqa: F401  (CI installs the test extra)
    elif not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_app(tmp_path):
    _need_browser()
    import torch

    from dinoapp import load_backbone
    from dinoapp.checkpoint import save_backbone

    bb = load_backbone("vit_tiny", depth=2, seed=0)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "gamma" in n:
                p.fill_(0.5)
    weights = save_backbone(bb, tmp_path / "tiny.safetensors")
    port = _port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "app.log", "w")  # noqa: SIM115 - open while the server runs, closed after it
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--weights", str(weights), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()
            assert time.time() < deadline, "the app did not start within 120 s"
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _image(path: Path) -> Path:
    from PIL import Image

    g = np.random.default_rng(0)
    img = np.zeros((96, 128, 3), np.float32)
    img[:, :64] = (200, 40, 40)
    img[:, 64:] = (40, 60, 200)
    img += g.normal(0, 12, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


def _series(tmp_path: Path) -> list:
    pytest.importorskip("pydicom")
    from tests.dicom_factory import make_series

    paths, _, _ = make_series(tmp_path / "series", n=5, rows=48, cols=48)
    return paths


def _shown(page, selector: str, must_contain: str) -> str:
    """The text a gr.JSON component shows, without whitespace (nested objects may show collapsed)."""
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_contain_text(must_contain, timeout=60_000)
    return "".join(page.locator(selector).inner_text().split())


def _ints(text: str, key: str) -> list[int]:
    """The integer, or list of integers, shown for ``"key":`` in a JSON text."""
    import re

    m = re.search(rf'"{key}":(\[[\d,]+\]|\d+)', text)
    assert m, (key, text[:300])
    return [int(v) for v in m.group(1).strip("[]").split(",")]


def test_explore_click_paint_train_predict_in_chromium(running_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("DINOAPP_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    png = _image(tmp_path / "two_regions.png")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(running_app)
            page.get_by_role("tab", name="Explorer").click()
            page.locator("#explore-files input[type=file]").set_input_files(str(png))
            page.locator("#explore-btn").click()
            shown = page.locator("#explore-image img")
            expect(shown).to_be_visible(timeout=60_000)
            page.screenshot(path=str(shots / "1_explored.png"), full_page=True)
            info = _shown(page, "#info", "grid")
            grid, size = _ints(info, "grid"), _ints(info, "size")  # patches (rows, cols), pixels (H, W) of the image
            box = shown.bounding_box()
            natural = shown.evaluate("e => [e.naturalWidth, e.naturalHeight]")
            assert natural == [size[1], size[0]]
            overlay = page.locator("#sim-a img")
            for fx, fy in ((0.25, 0.5), (0.8, 0.15)):  # a patch of the red half, then one of the blue half
                before = overlay.get_attribute("src") if overlay.count() else None
                shown.click(position={"x": box["width"] * fx, "y": box["height"] * fy})
                page.wait_for_function(
                    "(b) => { const i = document.querySelector('#sim-a img'); return i && i.complete && i.src !== b; }",
                    arg=before,
                    timeout=60_000,
                )
                text = _shown(page, "#topk", "row")
                top = json.loads(text[text.index("[") :])
                # the clicked pixel, in image pixels, and the patch it falls in on the processing grid
                x, y = fx * box["width"] * size[1] / box["width"], fy * box["height"] * size[0] / box["height"]
                expected = (int(y * grid[0] / size[0]), int(x * grid[1] / size[1]))
                assert (top[0]["row"], top[0]["col"]) == expected and top[0]["score"] >= 0.999, (top[0], expected)
            page.screenshot(path=str(shots / "2_similarity.png"), full_page=True)

            # a DICOM series: one volume, a slice slider spanning its slices (a fresh page: a new upload list)
            page.goto(running_app)
            page.get_by_role("tab", name="Explorer").click()
            page.locator("#explore-files input[type=file]").set_input_files([str(p) for p in _series(tmp_path)])
            page.locator("#explore-btn").click()
            expect(page.locator("#info")).to_contain_text("dicom", timeout=60_000)
            rng = page.locator("#slice input[type=range]")
            expect(rng).to_be_visible(timeout=30_000)
            assert rng.evaluate("e => [e.min, e.max, e.value]") == ["0", "4", "2"]  # 5 slices, the middle shown
            rng.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("() => document.querySelector('#info').innerText.replace(/\\s/g, '')"
                                   ".includes('\"slice\":3')", timeout=60_000)  # fmt: skip
            assert _ints(_shown(page, "#info", "slices"), "slice") == [3]
            page.keyboard.press("ArrowLeft")  # two quick steps: the last one wins, not the first
            page.keyboard.press("ArrowLeft")
            page.wait_for_function("() => document.querySelector('#info').innerText.replace(/\\s/g, '')"
                                   ".includes('\"slice\":1')", timeout=60_000)  # fmt: skip
            time.sleep(2)  # nothing later overwrites it
            assert _ints(_shown(page, "#info", "slices"), "slice") == [1]
            assert rng.evaluate("e => e.value") == "1"
            page.screenshot(path=str(shots / "5_dicom_slice.png"), full_page=True)
            page.goto(running_app)

            page.get_by_role("tab", name="Head trainer").click()
            page.locator("#train-file input[type=file]").set_input_files(str(png))
            canvas = page.locator("#editor canvas").first
            expect(canvas).to_be_visible(timeout=30_000)
            time.sleep(1.5)  # the editor draws the uploaded background
            page.locator("#class-names textarea, #class-names input").first.fill("red, blue")
            c = canvas.bounding_box()

            def stroke(fx0: float, fx1: float, fy: float) -> None:
                # the image is centred in the canvas, 4:3: paint well inside the chosen half
                page.mouse.move(c["x"] + c["width"] * fx0, c["y"] + c["height"] * fy)
                page.mouse.down()
                for t in range(1, 11):
                    page.mouse.move(c["x"] + c["width"] * (fx0 + (fx1 - fx0) * t / 10), c["y"] + c["height"] * fy)
                page.mouse.up()

            stroke(0.40, 0.44, 0.5)  # class 1 (first colour) on the red half
            page.get_by_role("button", name="Color").click()
            page.locator("#editor button.color").nth(1).click()
            stroke(0.57, 0.61, 0.5)  # class 2 on the blue half
            page.screenshot(path=str(shots / "3_scribbles.png"), full_page=True)
            page.locator("#add-btn").click()
            expect(page.locator("#status")).to_contain_text("1 training image", timeout=60_000)
            page.locator("#train-btn").click()
            expect(page.locator("#train-pred img")).to_be_visible(timeout=120_000)
            page.screenshot(path=str(shots / "4_trained.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert len(list(shots.glob("*.png"))) >= 4
