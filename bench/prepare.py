"""Benchmark of the prepare stage against a bare Pillow loop on ISS-like frames.

Makes N synthetic 1280x720 JPEG frames (quality 90, named like ISS frames), then prints:
  - the bare loop: Image.open + draft + resize to 48x27, on one core (images/s);
  - prepare (27x48 pixels and 54x96 thumbnails, cold cache) on every core:
    images/s, images/s per core, its share of the bare loop per core, CPU use in cores;
  - prepare again with a warm cache (nothing to decode);
  - peak memory (resident set) of prepare at N/2 and N, beside the size of its outputs.

Usage: python bench/prepare.py [--images N] [--workers W] [--folder bench/out]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import common, images, prepare  # noqa: E402

FRAME_WIDTH, FRAME_HEIGHT = 1280, 720
MODEL_SIZE = images.ImageSize(27, 48, "squash")
THUMB_SIZE = images.ImageSize(54, 96, "squash")
REPEATS = 3  # each figure is the best of this many runs: the machine is shared and noisy


def synthetic_frame(index: int) -> Image.Image:
    """A 1280x720 frame with an Earth-like gradient, clouds of noise and a dark corner."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:FRAME_HEIGHT, 0:FRAME_WIDTH].astype(np.float32)
    phase = index * 0.37
    base = np.stack(
        [
            60 + 40 * np.sin(x / 180 + phase),
            90 + 50 * np.sin(y / 140 + phase),
            150 + 60 * np.cos((x + y) / 260 + phase),
        ],
        axis=-1,
    )
    clouds = rng.normal(0, 1, (FRAME_HEIGHT // 16, FRAME_WIDTH // 16)).repeat(16, 0).repeat(16, 1)
    base += 60 * np.clip(clouds, 0, None)[..., None]
    base += rng.normal(0, 6, base.shape)
    base[: FRAME_HEIGHT // 5, : FRAME_WIDTH // 6] *= 0.2
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def write_frame(task: tuple[int, str]) -> None:
    """Write one frame as a quality-90 JPEG."""
    index, path = task
    synthetic_frame(index).save(path, format="JPEG", quality=90)


def make_frames(folder: Path, count: int) -> list[Path]:
    """Write `count` frames named YYYYMMDD-HHMMSS.jpg (reusing those already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = datetime(2017, 5, 12, 10, 0, 0)
    paths = [
        folder / f"{(start + timedelta(seconds=10 * index)):%Y%m%d-%H%M%S}.jpg"
        for index in range(count)
    ]
    missing = [(index, str(path)) for index, path in enumerate(paths) if not path.exists()]
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_frame, missing, chunksize=8))
    return paths


def bare_loop(paths: list[Path]) -> float:
    """Images per second of open + draft + resize to 48x27 on one core."""
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.draft("RGB", (MODEL_SIZE.width, MODEL_SIZE.height))
            image.resize((MODEL_SIZE.width, MODEL_SIZE.height), Image.Resampling.BOX)
    return len(paths) / (time.perf_counter() - started)


def bare_loop_per_core(paths: list[Path], workers: int) -> float:
    """Images per second per core of the bare loop run on `workers` processes at once."""
    shares = [paths[index::workers] for index in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(bare_loop, shares)) / workers


def write_manifest(paths: list[Path], path: Path) -> None:
    """The manifest prepare reads (id, path, sha256), made once by the parent process."""
    import pandas as pd

    manifest = pd.DataFrame(
        {
            "id": [frame.stem for frame in paths],
            "path": [frame.name for frame in paths],
            "sha256": [images.sha256_hex(frame.read_bytes()) for frame in paths],
        }
    )
    common.write_parquet(manifest, path)


def run_prepare(count: int, folder: Path, workers: int, cache: Path) -> dict:
    """Run prepare_arrays on the first `count` frames in this process; report time and memory."""
    import pandas as pd

    manifest = pd.read_parquet(folder / "manifest.parquet").iloc[:count]
    frames = folder / "frames"
    folder = folder / f"run-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    params = prepare.DecodeSizes(model_size=MODEL_SIZE, thumb_size=THUMB_SIZE)
    for name in ("pixels", "thumbs"):  # an earlier run's parts would be kept, not written
        shutil.rmtree(folder / name, ignore_errors=True)
    cpu_before = os.times()
    started = time.perf_counter()
    summary = prepare.prepare_arrays(
        manifest,
        frames,
        params,
        cache,
        folder / "pixels",
        folder / "thumbs",
        folder / "ids.parquet",
        workers,
    )
    seconds = time.perf_counter() - started
    cpu_after = os.times()
    cpu = sum(
        getattr(cpu_after, name) - getattr(cpu_before, name)
        for name in ("user", "system", "children_user", "children_system")
    )
    output_bytes = sum(
        path.stat().st_size for name in ("pixels", "thumbs") for path in (folder / name).iterdir()
    )
    return {
        "images": count,
        "decoded": summary.decoded,
        "seconds": seconds,
        "cores_busy": cpu / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "output_mb": output_bytes / 2**20,
    }


def prepare_in_fresh_process(count: int, folder: Path, workers: int, cache: Path) -> dict:
    """Run prepare on the first `count` frames in a new process, so peak memory is its own."""
    command = [
        sys.executable,
        __file__,
        "--child",
        str(count),
        "--folder",
        str(folder),
        "--workers",
        str(workers),
        "--cache",
        str(cache),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments, make frames, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=common.worker_count())
    parser.add_argument("--folder", type=Path, default=ROOT / "bench/out")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    frames = arguments.folder / "frames"

    if arguments.child:
        results = run_prepare(arguments.child, arguments.folder, arguments.workers, arguments.cache)
        print(json.dumps(results))
        return

    print(f"making {arguments.images} synthetic 1280x720 JPEG frames (q90) in {frames}")
    paths = make_frames(frames, arguments.images)
    mean_kb = np.mean([path.stat().st_size for path in paths]) / 1024
    print(f"  mean file size {mean_kb:.0f} KiB")
    write_manifest(paths, arguments.folder / "manifest.parquet")

    workers = arguments.workers
    bare_single = max(bare_loop(paths) for _ in range(REPEATS))
    bare = max(bare_loop_per_core(paths, workers) for _ in range(REPEATS))
    print(f"bare loop (open + draft + resize to 48x27), 1 process: {bare_single:.0f} images/s")
    print(f"bare loop on {workers} processes at once: {bare:.0f} images/s per core")

    cache = arguments.folder / "cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    half = prepare_in_fresh_process(len(paths) // 2, arguments.folder, workers, cache / "half")
    colds = [
        prepare_in_fresh_process(len(paths), arguments.folder, workers, cache / f"cold-{index}")
        for index in range(REPEATS)
    ]
    cold = min(colds, key=lambda run: run["seconds"])
    warm = prepare_in_fresh_process(len(paths), arguments.folder, workers, cache / "cold-0")

    rate = cold["images"] / cold["seconds"]
    per_core = rate / workers
    cpu_ms = 1000 * cold["cores_busy"] * cold["seconds"] / cold["images"]
    print(
        f"prepare, cold cache, {workers} workers (best of {REPEATS}): {rate:.0f} images/s, "
        f"{per_core:.0f} per core = {100 * per_core / bare:.0f}% of the bare loop per core; "
        f"{cold['cores_busy']:.2f} cores busy; {cpu_ms:.2f} ms CPU per image "
        f"(bare loop: {1000 / bare:.2f})"
    )
    print(
        f"prepare, warm cache: {warm['images'] / warm['seconds']:.0f} images/s "
        f"({warm['decoded']} decoded)"
    )
    for label, run in (("N/2", half), ("N", cold)):
        print(
            f"peak memory at {label} = {run['images']} images: main {run['peak_rss_mb']:.0f} MiB, "
            f"largest worker {run['peak_worker_rss_mb']:.0f} MiB, "
            f"outputs {run['output_mb']:.0f} MiB, "
            f"main minus outputs {run['peak_rss_mb'] - run['output_mb']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
