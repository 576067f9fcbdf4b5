"""Benchmark of the embed stage: encode throughput of simple_conv and peak memory.

Builds the simple_conv encoder for 27x48 images (the ISS size, filters 64/32/16: a
3x6x16 = 288-value latent), saves it as train does, makes N random 27x48 images and
runs the embed stage's own writer over them on each runtime (LiteRT, the default, and
Keras), printing images per second and the peak memory (resident set) of the process,
beside the size of the pixel array.

With --train-epoch it also times one training epoch of simple_conv on the same images
(images per second), on whatever device Keras uses (a GPU when one is there).

Usage: python bench/embed.py [--images N] [--batch-size B] [--runtime litert|keras]...
                            [--train-epoch]
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# stages first: it sets TensorFlow's environment (oneDNN on) before keras loads it.
from stages import embed, encoder_runtime, train  # noqa: E402, I001
import keras  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

HEIGHT, WIDTH = 27, 48


def iss_train_params(batch_size: int | None = None) -> train.TrainParams:
    """The committed train params with the original's filters and one epoch."""
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["train"].update({"model": "simple_conv", "filters": [64, 32, 16], "epochs": 1})
    if batch_size is not None:
        params["train"]["batch_size"] = batch_size
    return train.TrainParams.from_params(params)


def random_pixels(count: int, folder: Path) -> np.ndarray:
    """N random 27x48x3 uint8 images in a memory-mapped .npy, as prepare writes them."""
    path = folder / "pixels.npy"
    pixels = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.uint8, shape=(count, HEIGHT, WIDTH, 3)
    )
    rng = np.random.default_rng(0)
    for start in range(0, count, 65536):
        stop = min(count, start + 65536)
        pixels[start:stop] = rng.integers(0, 256, (stop - start, HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels.flush()
    del pixels
    return np.load(path, mmap_mode="r")


def devices() -> list[str]:
    """The devices the Keras backend computes on."""
    try:
        return [str(device) for device in keras.distribution.list_devices()]
    except Exception:  # not every backend lists its devices
        return ["(not listed by this backend)"]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_embed(folder: Path, pixels: np.ndarray, runtime: str, batch_size: int) -> None:
    """Embed every image with the encoder in `folder` on `runtime` and print the figures
    (after a warm-up run of four batches, outside the timing)."""
    started = time.perf_counter()
    encoder = encoder_runtime.open_encoder(
        folder / "encoder.keras", pixels.shape[1:], runtime, folder / "litert"
    )
    opened = time.perf_counter() - started
    warm = min(len(pixels), 4 * batch_size)
    warm_ids = [str(i) for i in range(warm)]
    embed.embed_images(
        encoder,
        pixels[:warm],
        warm_ids,
        warm_ids,
        folder / f"warm-cache-{runtime}",
        folder / f"warm-{runtime}",
        batch_size,
    )
    memory_before = peak_rss_mib()
    ids = [f"{index:08d}" for index in range(len(pixels))]
    output = folder / f"embeddings-{runtime}"
    started = time.perf_counter()
    embed.embed_images(
        encoder,
        pixels,
        ids,
        ids,  # every image distinct: each is encoded (the cache starts empty)
        folder / f"cache-{runtime}",
        output,
        batch_size,
    )
    seconds = time.perf_counter() - started
    print(
        f"embed simple_conv on {runtime} (opened in {opened:.1f} s"
        f"{', its conversion included' if runtime == 'litert' else ''}), "
        f"batch {batch_size}: {len(pixels) / seconds:.0f} images/s "
        f"({encoder.values} values each, {seconds:.1f} s)"
    )
    embeddings_mib = sum(p.stat().st_size for p in output.iterdir()) / 2**20
    pixel_mib = pixels.nbytes / 2**20
    print(
        f"peak memory: {peak_rss_mib():.0f} MiB "
        f"(before the timed run {memory_before:.0f} MiB; pixel array {pixel_mib:.0f} MiB, "
        f"embeddings {embeddings_mib:.0f} MiB on disk)"
    )


def main() -> None:
    """Parse arguments, run the benchmark, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--runtime", action="append", choices=["litert", "keras"], help="default: both"
    )
    parser.add_argument("--train-epoch", action="store_true")
    parser.add_argument("--train-batch-size", type=int, help="default: train.batch_size")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        params = iss_train_params(arguments.train_batch_size)
        models = train.build_models(HEIGHT, WIDTH, params)
        train.save_model(models.encoder, folder / "encoder.keras")
        pixels = random_pixels(arguments.images, folder)
        pixel_mib = pixels.nbytes / 2**20
        print(f"backend {keras.backend.backend()}, devices: {', '.join(devices())}")
        print(f"{arguments.images} random {HEIGHT}x{WIDTH} images ({pixel_mib:.0f} MiB of pixels)")

        for runtime in arguments.runtime or ["litert", "keras"]:
            time_embed(folder, pixels, runtime, arguments.batch_size)

        if arguments.train_epoch:
            rows = {"train": np.arange(len(pixels)), "valid": np.arange(0), "test": np.arange(0)}
            warm_rows = {
                "train": np.arange(min(len(pixels), 512)),
                "valid": rows["valid"],
                "test": rows["test"],
            }
            train.fit(train.build_models(HEIGHT, WIDTH, params), pixels, warm_rows, params)
            models = train.build_models(HEIGHT, WIDTH, params)
            started = time.perf_counter()
            train.fit(models, pixels, rows, params)
            seconds = time.perf_counter() - started
            print(
                f"train simple_conv, one epoch, batch {params.batch_size}: "
                f"{len(pixels) / seconds:.0f} images/s ({seconds:.1f} s)"
            )


if __name__ == "__main__":
    main()
