"""How the explorer copes with many images: build time, page load, frame times, memory.

Builds an explorer of synthetic thumbnails (50 clusters on a 2-D map) for each size asked
and opens it from disk in headless Debian chromium (software WebGL: SwiftShader, as on a
machine with no GPU), then prints:
  - the stage's work (atlases, data script) and the files' sizes;
  - the load: until the first frame is drawn, and until every icon atlas is on the GPU;
  - frames while panning (mouse drags) and zooming (wheel), fitted and zoomed in:
    median and 95th percentile of the intervals between animation frames;
  - a grid re-layout (bin by cluster) and a text filter;
  - the peak memory (proportional set size) of the tab's renderer process, of the GPU
    process (which holds the textures under SwiftShader), and of chromium as a whole.

Goals (issue 15): at 100,000 images, load within 5 s and a median frame within 33 ms; at
1,000,000, load within 20 s, a median frame within 100 ms and the tab under 3 GB.

Usage: python bench/explore.py [--images 100000 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages import explore

CHROMIUM = "/usr/bin/chromium"
CLUSTERS = 50
THUMB_SHAPE = (54, 96, 3)


class SyntheticThumbs:
    """Thumbnails made when asked for, so a million need no 15 GB array: each cluster a
    color, each image a patch of its own color."""

    def __init__(self, clusters: np.ndarray, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.clusters = clusters
        self.palette = rng.integers(0, 256, (CLUSTERS, 3), dtype=np.uint8)
        self.patches = rng.integers(0, 256, (len(clusters), 3), dtype=np.uint8)
        self.shape = (len(clusters), *THUMB_SHAPE)

    def __getitem__(self, rows: int | np.ndarray) -> np.ndarray:
        scalar = np.ndim(rows) == 0
        rows = np.atleast_1d(np.asarray(rows))
        thumbs = np.empty((len(rows), *THUMB_SHAPE), dtype=np.uint8)
        thumbs[:] = self.palette[self.clusters[rows]][:, None, None, :]
        thumbs[:, 20:34, 30:66] = self.patches[rows][:, None, None, :]
        return thumbs[0] if scalar else thumbs


def synthetic_table(count: int, seed: int = 0) -> pd.DataFrame:
    """Every column the page reads: clusters as blobs on the map, a day of frames."""
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, CLUSTERS, count)
    centers = rng.normal(0, 10, (CLUSTERS, 2))
    points = centers[clusters] + rng.normal(0, 1, (count, 2))
    seconds = np.sort(rng.integers(0, 30 * 86400, count))
    taken = pd.Timestamp("2017-05-01") + pd.to_timedelta(seconds, unit="s")
    table = pd.DataFrame(
        {
            "id": [f"frame-{i:07d}" for i in range(count)],
            "path": [f"frames/{i:07d}.jpg" for i in range(count)],
            "cluster": clusters,
            "x": points[:, 0],
            "y": points[:, 1],
            "silhouette": rng.uniform(-0.2, 0.8, count),
            "subset": rng.choice(["train", "test", "valid"], count),
            "taken_at": taken.strftime("%Y-%m-%d %H:%M:%S"),
            "month": taken.strftime("%Y-%m"),
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
    ids = table["id"].to_numpy()
    table["neighbors"] = [list(ids[(i + np.arange(1, 9)) % count]) for i in range(count)]
    # Every tenth image holds one of 20 visual patterns.
    held = [[int(i % 200) // 10 + 1] if i % 10 == 0 else [] for i in range(count)]
    table["patterns"] = held
    table["pattern_scores"] = [[0.6] * len(h) for h in held]
    table["pattern"] = [float(h[0]) if h else np.nan for h in held]
    return table


class PeakMemory:
    """Samples chromium's processes every 0.2 s and keeps each kind's peak PSS (MiB)."""

    def __init__(self, browser_pid: int) -> None:
        self.root = psutil.Process(browser_pid)
        self.peaks = {"renderer": 0.0, "gpu": 0.0, "all": 0.0}
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            totals = {"renderer": 0.0, "gpu": 0.0, "all": 0.0}
            for process in [self.root, *self.root.children(recursive=True)]:
                try:
                    pss = process.memory_full_info().pss / 2**20
                    command = " ".join(process.cmdline())
                except psutil.Error:
                    continue
                totals["all"] += pss
                if "--type=renderer" in command:
                    totals["renderer"] += pss
                elif "--type=gpu-process" in command:
                    totals["gpu"] += pss
            for kind, value in totals.items():
                self.peaks[kind] = max(self.peaks[kind], value)
            time.sleep(0.2)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.thread.join()
        return self.peaks


def record_frames(page: object) -> None:
    page.evaluate(
        """() => { window.__frames = []; window.__recording = true; let last = performance.now();
        function tick(now) { window.__frames.push(now - last); last = now;
          if (window.__recording) requestAnimationFrame(tick); }
        requestAnimationFrame(tick); }"""
    )


def frame_figures(page: object) -> str:
    frames = page.evaluate("window.__recording = false, window.__frames.slice(1)")
    busy = [f for f in frames if f > 0]
    median, p95 = statistics.median(busy), float(np.percentile(busy, 95))
    return f"{len(busy)} frames, median {median:.1f} ms, 95th percentile {p95:.1f} ms"


def pan_and_zoom(page: object, center: tuple[int, int]) -> None:
    """Drag across the view, then zoom in and out with the wheel."""
    x, y = center
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(40):
        page.mouse.move(x + 6 * step, y + 4 * step)
    for step in range(40, 0, -1):
        page.mouse.move(x + 6 * step, y + 4 * step)
    page.mouse.up()
    for _ in range(10):
        page.mouse.wheel(0, -120)
        page.wait_for_timeout(16)
    for _ in range(10):
        page.mouse.wheel(0, 120)
        page.wait_for_timeout(16)


def measure(count: int) -> None:
    from playwright.sync_api import sync_playwright

    started = time.perf_counter()
    table = synthetic_table(count)
    thumbs = SyntheticThumbs(table["cluster"].to_numpy())
    print(f"\n== {count:,} images (synthetic table: {time.perf_counter() - started:.1f} s)")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        summary = dict.fromkeys(
            ("collection_images", "clustered_images", "shown_images", "with_timestamp"), count
        )
        summary.update(rejected_files=0, with_location=count, blank_images=0, duplicate_images=0)
        summary.update(near_groups=0, near_copies=0)
        params = explore.ExploreParams(max_images=10**7, sprite_height=54, atlas_quality=85, seed=0)
        started = time.perf_counter()
        data, _ = explore.build_explorer(
            explore.ExplorerTable.of_frame(table),
            thumbs,
            summary,
            params,
            root / "explorer",
            root / "collections",
        )
        print(f"stage work: {time.perf_counter() - started:.1f} s")
        sizes = {p.name: p.stat().st_size for p in (root / "explorer").iterdir()}
        full = sum(v for k, v in sizes.items() if k.startswith("atlas-")) / 2**20
        icons = sum(v for k, v in sizes.items() if k.startswith("icons-")) / 2**20
        atlas = data["atlas"]
        print(
            f"files: data.js {sizes['data.js'] / 2**20:.0f} MiB; {len(atlas['files'])} atlases "
            f"of {atlas['columns']}x{atlas['rows']} sprites, {full:.0f} MiB full-size, "
            f"{icons:.0f} MiB icons of {atlas['icon']['width']}x{atlas['icon']['height']} px"
        )
        del table, thumbs, data

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            pids = [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "chromium"]
            memory = PeakMemory(min(pids))
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            started = time.perf_counter()
            page.goto((root / "explorer/index.html").as_uri(), timeout=300000)
            page.wait_for_function(
                "() => window.explorer && window.explorer.lastDrawMs() > 0", timeout=300000
            )
            first = time.perf_counter() - started
            page.wait_for_function("() => window.explorer.atlasesLoaded()", timeout=300000)
            loaded = time.perf_counter() - started
            times = page.evaluate("window.explorer.loadTimes()")
            print(
                f"load (from the page's start): first frame {times['firstFrame'] / 1000:.1f} s, "
                f"every icon on the GPU {times['icons'] / 1000:.1f} s; as the test driver saw "
                f"it: {first:.1f} s and {loaded:.1f} s"
            )

            draw = "() => { const t = performance.now(); window.explorer.draw(); "
            draw += "return performance.now() - t; }"
            frames = [page.evaluate(draw) for _ in range(10)]
            how = page.evaluate("window.explorer.lastFrame()")
            print(
                f"one whole frame, all images in view ({how}): median "
                f"{statistics.median(frames):.1f} ms"
            )
            for zoom in (1, 6, 40):
                page.evaluate("window.explorer.fitView()")
                page.evaluate(f"window.explorer.zoomAt({zoom}, 900, 500)")
                page.wait_for_timeout(1500)  # the view rests: full-size atlases come
                level = page.evaluate("window.explorer.detailLevel()")
                resident = len(page.evaluate("window.explorer.residentAtlases()"))
                how = page.evaluate("window.explorer.lastFrame()")
                record_frames(page)
                pan_and_zoom(page, (900, 500))
                print(
                    f"panning and zooming at {zoom}x the fitted view ({how}, detail level "
                    f"{level}, {resident} full-size atlases on the GPU): {frame_figures(page)}"
                )
            page.evaluate("window.explorer.fitView()")
            started = time.perf_counter()
            page.select_option("#layout", "grid")
            page.evaluate("() => new Promise((done) => requestAnimationFrame(() => done()))")
            print(f"switch to the grid by cluster: {1000 * (time.perf_counter() - started):.0f} ms")
            started = time.perf_counter()
            page.fill("#filter-text", "pacific")
            page.evaluate("() => new Promise((done) => requestAnimationFrame(() => done()))")
            shown = page.text_content("#shown")
            elapsed = 1000 * (time.perf_counter() - started)
            print(f"text filter ({shown} shown): {elapsed:.0f} ms")
            peaks = memory.stop()
            print(
                f"peak memory (PSS): tab {peaks['renderer']:,.0f} MiB, GPU process "
                f"{peaks['gpu']:,.0f} MiB, chromium in all {peaks['all']:,.0f} MiB"
            )
            if errors:
                print(f"page errors: {errors}")
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000])
    arguments = parser.parse_args()
    for count in arguments.images:
        measure(count)


if __name__ == "__main__":
    main()
