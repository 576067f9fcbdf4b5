"""How the explorer copes with many images: build time, page load, and frame times.

Builds an explorer of synthetic thumbnails (50 clusters on a 2-D map) and opens it in
headless Debian chromium (software rendering, as on a machine with no GPU), then times:
  - the stage's work (atlases, data script) and the files' sizes;
  - the page load until every atlas is decoded;
  - draw() of a whole frame: all images at the fitted view, then zoomed in;
  - a grid re-layout (bin by cluster) and a filter;
  - frames while panning with the mouse (requestAnimationFrame intervals).

Usage: python bench/explore.py [--images 15000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages import explore

CHROMIUM = "/usr/bin/chromium"
CLUSTERS = 50


def synthetic(count: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A table and 54x96 thumbnails: each cluster a color and a blob on the map."""
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, CLUSTERS, count)
    centers = rng.normal(0, 10, (CLUSTERS, 2))
    points = centers[clusters] + rng.normal(0, 1, (count, 2))
    palette = rng.integers(0, 256, (CLUSTERS, 3), dtype=np.uint8)
    thumbs = np.empty((count, 54, 96, 3), dtype=np.uint8)
    thumbs[:] = palette[clusters][:, None, None, :]
    thumbs[:, 20:34, 30:66] = rng.integers(0, 256, (count, 1, 1, 3), dtype=np.uint8)
    table = pd.DataFrame(
        {
            "id": [f"{20170512 + i // 86400:08d}-{i % 86400:06d}" for i in range(count)],
            "path": [f"frames/{i:07d}.jpg" for i in range(count)],
            "cluster": clusters,
            "x": points[:, 0],
            "y": points[:, 1],
            "silhouette": rng.uniform(-0.2, 0.8, count),
            "subset": rng.choice(["train", "test", "valid"], count),
            "taken_at": "2017-05-12 10:32:00",
            "month": "2017-05",
            "place": rng.choice(["Pacific Ocean", "Sahara", None], count),
            "latitude": rng.uniform(-50, 50, count),
            "longitude": rng.uniform(-180, 180, count),
            "label": None,
            "blank": False,
            "duplicate": False,
            "near_group": 0,
            "near_of": None,
            "near_size": 1,
        }
    )
    # Eight neighbours an image, as health lists them: here the next images by row.
    ids = table["id"].tolist()
    table["neighbors"] = [[ids[(i + step) % count] for step in range(1, 9)] for i in range(count)]
    return table, thumbs


def frame_stats(page: object, script: str, repeats: int) -> tuple[float, float]:
    """Median and worst milliseconds of `script` (which returns a duration) over repeats."""
    times = [page.evaluate(script) for _ in range(repeats)]
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=15000)
    arguments = parser.parse_args()
    from playwright.sync_api import sync_playwright

    table, thumbs = synthetic(arguments.images)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        summary = dict.fromkeys(
            ("collection_images", "clustered_images", "shown_images", "with_timestamp"),
            len(table),
        )
        summary.update(rejected_files=0, with_location=0, blank_images=0, duplicate_images=0)
        params = explore.ExploreParams(max_images=10**6, sprite_height=54, atlas_quality=85, seed=0)
        started = time.perf_counter()
        data, _ = explore.build_explorer(
            table, thumbs, summary, params, root / "explorer", root / "collections"
        )
        build_seconds = time.perf_counter() - started
        sizes = {p.name: p.stat().st_size for p in (root / "explorer").iterdir()}
        atlas_mib = sum(v for k, v in sizes.items() if k.startswith("atlas-")) / 2**20
        print(f"images: {arguments.images:,}, {len(data['atlas']['files'])} atlas(es)")
        print(f"stage work: {build_seconds:.1f} s")
        print(f"files: data.js {sizes['data.js'] / 2**20:.1f} MiB, atlases {atlas_mib:.1f} MiB")

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            started = time.perf_counter()
            page.goto((root / "explorer/index.html").as_uri())
            page.wait_for_function(
                "window.explorer && window.explorer.atlasesLoaded()", timeout=120000
            )
            print(f"page load until atlases are decoded: {time.perf_counter() - started:.2f} s")
            draw = "(() => { const t = performance.now(); window.explorer.draw(); "
            draw += "return performance.now() - t; })()"
            median, worst = frame_stats(page, draw, 20)
            print(f"draw, all images in view: median {median:.1f} ms, worst {worst:.1f} ms")
            page.evaluate("window.explorer.zoomAt(6, 800, 500)")
            median, worst = frame_stats(page, draw, 20)
            print(f"draw, zoomed in 6x: median {median:.1f} ms, worst {worst:.1f} ms")
            page.evaluate("window.explorer.fitView()")
            started = time.perf_counter()
            page.select_option("#layout", "grid")
            page.evaluate("new Promise((done) => requestAnimationFrame(() => done()))")
            print(f"switch to the grid by cluster: {1000 * (time.perf_counter() - started):.0f} ms")
            started = time.perf_counter()
            page.fill("#filter-text", "pacific")
            page.evaluate("new Promise((done) => requestAnimationFrame(() => done()))")
            shown = page.text_content("#shown")
            elapsed = 1000 * (time.perf_counter() - started)
            print(f"text filter ({shown} shown): {elapsed:.0f} ms")
            page.fill("#filter-text", "")
            page.evaluate(
                """() => { window.__frames = []; let last = performance.now();
                function tick(now) { window.__frames.push(now - last); last = now;
                  if (window.__frames.length < 400) requestAnimationFrame(tick); }
                requestAnimationFrame(tick); }"""
            )
            page.mouse.move(800, 500)
            page.mouse.down()
            for step in range(60):
                page.mouse.move(800 + 5 * step, 500 + 3 * step)
            page.mouse.up()
            frames = page.evaluate("window.__frames.slice(1)")
            busy = [f for f in frames if f > 0]
            print(
                f"panning: {len(busy)} frames, median {statistics.median(busy):.1f} ms, "
                f"95th percentile {float(np.percentile(busy, 95)):.1f} ms"
            )
            browser.close()


if __name__ == "__main__":
    main()
