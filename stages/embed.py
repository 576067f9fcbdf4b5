"""embed: encode every image (not a sample) into its latent vector.

Params:  EmbedParams below (params.yaml, section embed)
Inputs:  models/autoencoder/encoder.keras, data/interim/pixels.npy, data/interim/ids.parquet
Outputs: data/processed/embeddings.parquet (id, embedding: a fixed-size list of float32)

Images are encoded a batch at a time and written in Parquet row groups, so memory does
not grow with the collection beyond the memory-mapped pixel array.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from stages import common, settings
from stages.quiet_start import keras

STAGE = "embed"
ROW_GROUP_ROWS = 65536  # images per Parquet row group: the most held in memory at once


class EmbedParams(settings.Section):
    """params.yaml, section embed."""

    SECTION: ClassVar[str] = "embed"
    batch_size: int = Field(512, ge=1, description="images encoded per step")


def load_encoder(path: Path, image_shape: tuple[int, ...]) -> keras.Model:
    """Load the encoder and check it takes images of `image_shape` (height, width, 3)."""
    if not path.exists():
        raise common.UserError(f"{path} is missing: run `dvc repro train` first")
    try:
        encoder = keras.saving.load_model(path, compile=False)
    except Exception as error:  # a file that is not a Keras model, or from another version
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise common.UserError(f"cannot load the encoder {path}: {message}") from None
    expected = tuple(encoder.input_shape[1:])
    if expected != tuple(image_shape):
        raise common.UserError(
            f"{path} expects {expected[0]}x{expected[1]} images but the pixels are "
            f"{image_shape[0]}x{image_shape[1]}: rerun `dvc repro train` after changing image.*"
        )
    return encoder


def encode_batches(encoder: keras.Model, pixels: np.ndarray, batch_size: int) -> Any:
    """Yield float32 (rows, dimension) embeddings of consecutive batches of pixels."""
    for start in range(0, len(pixels), batch_size):
        images = pixels[start : start + batch_size].astype(np.float32) / 255.0
        codes = np.asarray(encoder.predict_on_batch(images), dtype=np.float32)
        yield codes.reshape(len(images), -1)


def embeddings_table(ids: list[str], codes: np.ndarray) -> pa.Table:
    """An (id, embedding) table with each embedding a fixed-size list of float32."""
    values = pa.array(codes.ravel(), type=pa.float32())
    embedding = pa.FixedSizeListArray.from_arrays(values, codes.shape[1])
    return pa.table({"id": pa.array(ids, type=pa.string()), "embedding": embedding})


def write_embeddings(
    encoder: keras.Model, pixels: np.ndarray, ids: list[str], path: Path, batch_size: int
) -> int:
    """Encode every image and write the embeddings table atomically; return its dimension."""
    dimension = int(math.prod(encoder.output_shape[1:]))
    schema = embeddings_table([], np.zeros((0, dimension), dtype=np.float32)).schema
    with (
        common.atomic_output(path) as temporary,
        pq.ParquetWriter(temporary, schema) as writer,
        common.progress_bar(len(pixels), STAGE) as bar,
    ):
        for start in range(0, len(pixels), ROW_GROUP_ROWS):
            stop = min(len(pixels), start + ROW_GROUP_ROWS)
            blocks = []
            for codes in encode_batches(encoder, pixels[start:stop], batch_size):
                blocks.append(codes)
                bar.update(len(codes))
            writer.write_table(embeddings_table(ids[start:stop], np.concatenate(blocks)))
    return dimension


def main() -> None:
    """Read params, the encoder and the pixels; write the embeddings."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    batch_size = EmbedParams.from_params(settings.load_params()).batch_size
    ids, pixels = common.load_pixels(common.PIXELS_FILE)
    encoder = load_encoder(common.ENCODER_FILE, pixels.shape[1:])
    dimension = write_embeddings(encoder, pixels, ids, common.EMBEDDINGS_FILE, batch_size)
    seconds = time.perf_counter() - started
    logger.info(
        "%d images encoded into %d values each; backend %s; %.1f s (%.0f images/s)",
        len(ids),
        dimension,
        keras.backend.backend(),
        seconds,
        len(ids) / seconds if seconds else 0.0,
    )


if __name__ == "__main__":
    common.run_stage(main)
