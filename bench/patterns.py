"""Visual words and patterns: local features per second, vocabulary time, mining time.

Prints, on this machine:
  - local features (SIFT and ORB, 300 strongest) per second on one core, on 1280x720
    ISS-like JPEG frames (tools/iss_frames.py) with a textured object pasted in, at the
    stage's default side (480 px) and at full size;
  - encoder cells (words.detector: encoder): images per second through an untrained
    simple_conv encoder of the ISS size (27x48, 3x6 cells), from prepared pixels;
  - the vocabulary's fit (MiniBatchKMeans, 2,000 words) on 250,000 SIFT descriptors;
  - mining (the mine stage's mine_patterns, shipped params) on synthetic bags of
    words: N images of 300 keypoints over 2,000 words drawn from a Zipf-like law, one
    set of 20 rare words planted in 5% of them; its time, how well the planted set is
    found, and the peak memory of a process that only mines.

Usage: python bench/patterns.py [--mine 10000 100000] [--frames 40]
"""

from __future__ import annotations

import argparse
import io
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import mine, pattern_model, words  # noqa: E402
from tools.iss_frames import ISS_SCENES, iss_frame  # noqa: E402

KEYPOINTS = 300
VOCABULARY = 2000


def frames(count: int) -> list[bytes]:
    """JPEG frames of every scene kind, each with a small block texture pasted in."""
    rng = np.random.default_rng(0)
    made = []
    for index in range(count):
        image = iss_frame(index % len(ISS_SCENES), seed=index)
        cells = rng.integers(0, 2, (8, 8))
        block = (np.kron(cells, np.ones((12, 12)))[..., None] * [230, 200, 90]).astype(np.uint8)
        x, y = int(rng.integers(0, 1180)), int(rng.integers(0, 620))
        image.paste(Image.fromarray(block), (x, y))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        made.append(buffer.getvalue())
    return made


def features_per_second(jpegs: list[bytes], detector: str, side: int) -> tuple[float, float]:
    """Images per second and keypoints per image, one core, decoding included."""
    started = time.perf_counter()
    found = 0
    for data in jpegs:
        gray = words.gray_image(data, side)
        found += len(words.keypoints_of(gray, detector, KEYPOINTS).places)
    return len(jpegs) / (time.perf_counter() - started), found / len(jpegs)


def encoder_cells_per_second(count: int) -> float:
    """Images per second whose 3x6 cells a 27x48 simple_conv encoder gives (keypoints
    chosen), after one warm-up batch."""
    from stages import embed, encoder_cells, train

    params = train.TrainParams()  # the shipped defaults: filters 64, 32, 16
    encoder = train.build_models(27, 48, params).encoder
    model = encoder_cells.feature_map_model(encoder)
    pixels = np.random.default_rng(0).integers(0, 256, (count, 27, 48, 3), dtype=np.uint8)
    batch = encoder_cells.BATCH
    embed.predict_padded(model, pixels[:batch], batch)
    started = time.perf_counter()
    for at in range(0, count, batch):
        maps = embed.predict_padded(model, pixels[at : at + batch], batch)
        encoder_cells.cell_keypoints(maps, KEYPOINTS)
    return count / (time.perf_counter() - started)


def synthetic_bags(count: int, seed: int = 0) -> tuple[pd.DataFrame, list[str], set[str]]:
    """Words of `count` images (Zipf-like), a planted set of 20 rare words in 5% of them."""
    rng = np.random.default_rng(seed)
    law = 1 / np.arange(1, VOCABULARY + 1) ** 0.8
    drawn = rng.choice(VOCABULARY, size=(count, KEYPOINTS), p=law / law.sum())
    planted = rng.random(count) < 0.05
    drawn[planted, :20] = rng.choice(np.arange(VOCABULARY - 500, VOCABULARY), 20, replace=False)
    ids = [f"image-{index:07d}" for index in range(count)]
    table = pd.DataFrame(
        {
            "id": np.repeat(ids, KEYPOINTS),
            "word": drawn.ravel().astype(np.int32),
            "x": np.float32(0.5),
            "y": np.float32(0.5),
            "size": np.float32(0.02),
        }
    )
    return table, ids, {ids[row] for row in np.flatnonzero(planted)}


def mine_once(count: int) -> None:
    """Mine synthetic bags of `count` images and print the figures (run in a child)."""
    table, ids, planted = synthetic_bags(count)
    started = time.perf_counter()
    found, holders, sets, *_ = mine.mine_patterns(table, ids, pattern_model.PatternsParams())
    seconds = time.perf_counter() - started
    best = (0.0, 0.0)
    for number in found["pattern"]:
        held = set(holders.loc[holders["pattern"] == number, "id"])
        both = len(held & planted)
        best = max(best, (both / len(held), both / len(planted)), key=sum)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"mining {count:,} images x {KEYPOINTS} keypoints: {seconds:.1f} s; {sets} word sets, "
        f"{len(found)} patterns; the planted set found with precision {best[0]:.2f}, recall "
        f"{best[1]:.2f}; peak memory of the process {peak:,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mine", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--mine-once", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.mine_once:
        mine_once(arguments.mine_once)
        return

    jpegs = frames(arguments.frames)
    descriptors = []
    for detector in ("sift", "orb"):
        for side in (480, 1280):
            rate, found = features_per_second(jpegs, detector, side)
            print(
                f"{detector} at {side} px on 1280x720 JPEG frames: {rate:.1f} images/s on one "
                f"core ({found:.0f} keypoints an image, decoding included)"
            )
    rate = encoder_cells_per_second(10_000)
    print(f"encoder cells (27x48 simple_conv, 18 cells): {rate:,.0f} images/s on this machine")
    for data in jpegs:
        gray = words.gray_image(data, 480)
        descriptors.append(words.keypoints_of(gray, "sift", KEYPOINTS).descriptors)
    pool = np.concatenate(descriptors)
    sample = pool[np.random.default_rng(0).integers(0, len(pool), words.MAX_SAMPLE_DESCRIPTORS)]
    sample = sample + np.random.default_rng(1).normal(0, 2, sample.shape).astype(np.float32)
    started = time.perf_counter()
    words.fit_vocabulary(sample, VOCABULARY, seed=0)
    print(
        f"vocabulary: {VOCABULARY} words from {len(sample):,} SIFT descriptors in "
        f"{time.perf_counter() - started:.1f} s"
    )
    for count in arguments.mine:
        # A child process each, so that its peak memory is the mining's alone.
        subprocess.run([sys.executable, __file__, "--mine-once", str(count)], check=True)


if __name__ == "__main__":
    main()
