"""Click-to-heatmap latency of the app through its API, with the features cached, vs the library alone.

Starts the app in this process (127.0.0.1, a free port), explores one image once (the forward pass),
then times a click's ``/similarity`` call, in the same run and round-robin:

- through the HTTP API as the browser and ``curl`` use it: ``POST /gradio_api/run/similarity`` with
  the session id, then ``GET`` the overlay image it names (request, handler, JPEG encoding, download);
- through ``gradio_client`` (the Python client: its queue protocol on top of the same);
- the handler alone (``App.similarity``: the library call), the baseline;
- and, when Chromium is there, from a click on the displayed image to the new overlay in the page.

Target: < 150 ms end to end on CPU with ViT-S at 512 px. The image is scikit-image's astronaut photo
resized to the size (``--noise`` for uniform noise, the worst case for image encoding).

    python benchmarks/app_latency.py                      # ViT-S/16 (random weights), 512 px
    python benchmarks/app_latency.py --weights vit_small_patch16_dinov3.lvd1689m --size 1024
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app as A  # noqa: E402


def browser_clicks(url: str, image, args) -> list[float]:
    """Seconds from a click on the displayed image to the new similarity overlay, in headless Chromium."""
    from pathlib import Path as _P

    if not _P(args.browser).exists():
        return []
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--no-first-run"]  # fmt: skip
    out = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=args.browser, headless=True, args=flags)
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_role("tab", name="Explorer").click()
        page.locator("#explore-files input[type=file]").set_input_files(str(image))
        page.locator("#explore-btn").click()
        shown = page.locator("#explore-image img")
        shown.wait_for(timeout=120_000)
        box = shown.bounding_box()
        g = np.random.default_rng(1)
        for i in range(args.clicks + 2):
            before = page.locator("#sim-a img").get_attribute("src") if page.locator("#sim-a img").count() else None
            t0 = time.perf_counter()
            x, y = float(g.uniform(1, box["width"] - 1)), float(g.uniform(1, box["height"] - 1))
            shown.click(position={"x": x, "y": y})
            page.wait_for_function("(b) => { const i = document.querySelector('#sim-a img'); return i && i.complete"
                                   " && i.src !== b; }", arg=before, timeout=30_000)  # fmt: skip
            if i >= 2:
                out.append(time.perf_counter() - t0)
        b.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="vits16", help="backbone (an arch name = random weights)")
    ap.add_argument("--size", type=int, default=512, help="image side and processing resolution")
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--browser", default="/usr/bin/chromium", help="also time clicks in this Chromium ('' to skip)")
    ap.add_argument("--noise", action="store_true", help="a noise image instead of a photo")
    args = ap.parse_args()
    import httpx
    from gradio_client import Client, handle_file
    from PIL import Image

    tmp = Path(tempfile.mkdtemp())
    g = np.random.default_rng(0)
    try:
        if args.noise:
            raise ImportError
        from skimage.data import astronaut

        photo = Image.fromarray(astronaut()).resize((args.size, args.size), Image.BICUBIC)
    except ImportError:
        photo = Image.fromarray((g.random((args.size, args.size, 3)) * 255).astype(np.uint8))
    photo.save(tmp / "img.png")
    app = A.App(A.Settings(weights=args.weights))
    demo = A.build_ui(app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        t0 = time.perf_counter()
        c.predict([handle_file(tmp / "img.png")], args.size, -1, "", "auto", 0, False, api_name="/explore")
        explore_s = time.perf_counter() - t0
        pts = g.uniform(0, args.size - 1, size=(args.clicks + 2, 2))
        api, http, lib = [], [], []
        session, *_ = app.explore(None, [str(tmp / "img.png")], resolution=args.size)
        h = httpx.Client(base_url=f"http://127.0.0.1:{port}")
        for i, (x, y) in enumerate(pts):  # round-robin: gradio_client, raw HTTP, the handler alone
            t0 = time.perf_counter()
            c.predict(float(x), float(y), 5, 0, api_name="/similarity")
            t1 = time.perf_counter()
            r = h.post("/gradio_api/run/similarity",
                       json={"data": [None, float(x), float(y), 5, 0], "session_hash": c.session_hash})  # fmt: skip
            r.raise_for_status()
            overlay = h.get(r.json()["data"][1]["url"])
            overlay.raise_for_status()
            t2 = time.perf_counter()
            app.similarity(session, float(x), float(y), 5)
            t3 = time.perf_counter()
            if i >= 2:
                api.append(t1 - t0)
                http.append(t2 - t1)
                lib.append(t3 - t2)
        h.close()
        browser = browser_clicks(f"http://127.0.0.1:{port}/", tmp / "img.png", args) if args.browser else []
    finally:
        demo.close()
    def row(name: str, xs: list[float]) -> float:
        m = statistics.median(xs) * 1e3
        print(f"{name:<40}{m:>10.1f}{np.percentile(xs, 90) * 1e3:>10.1f}")
        return m

    grid = args.size // 16
    kind = "noise" if args.noise else "photo"
    print(f"backbone {args.weights}, image {args.size}x{args.size} ({grid}x{grid} patches, {kind}), "
          f"{args.clicks} clicks; overlay {len(overlay.content) // 1024} KB")  # fmt: skip
    print(f"explore (forward pass + PCA, through the API): {explore_s * 1e3:.0f} ms")
    print(f"{'click -> heatmap':<40}{'median ms':>10}{'p90 ms':>10}")
    m_http = row("HTTP API: POST + GET overlay (end to end)", http)
    m_client = row("gradio_client (Python client)", api)
    m_lib = row("handler alone (library)", lib)
    if browser:
        row("in Chromium (click -> overlay shown)", browser)
    print(f"HTTP API: {m_http / m_lib:.1f}x the library call, gradio_client {m_client / m_lib:.1f}x; "
          f"target < 150 ms end to end through the HTTP API: {'met' if m_http < 150 else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
