"""embed: encode every image (not a sample) into its latent vector.

Params:  EmbedParams below (params.yaml, section embed)
Inputs:  models/autoencoder/ (spec.json, and encoder.keras unless train.encoder is bovw),
         models/descriptor.npz, data/interim/pixels/, data/interim/ids.parquet,
         data/processed/words/ (bovw)
Outputs: data/processed/embeddings/ (parts of a table of id, embedding: a fixed-size list
         of float32; each part's metadata's embed_key names the encoder and the decode
         settings; see parts.py: a daily run writes only the parts whose images changed)

An image's vector is the encoder's values (or, for `train.encoder: bovw`, its bag of
visual words, TF-IDF weighted) through the scaling and PCA the describe stage fitted
(stages/descriptors.py). The encoder runs on LiteRT, converted once per encoder file, or on
Keras (`embed.runtime`, see stages/encoder_runtime.py). Vectors are kept in
data/cache/embed/ by image sha256, the model files' hashes, the runtime and the decode
settings (or the words' key), so with a frozen encoder
(`dvc freeze train describe`) only new images are encoded. Images are encoded a batch at a time
and written in Parquet row groups, so memory does not grow with the collection beyond
the memory-mapped pixel array.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from stages import common, compute, descriptors, encoder_runtime, parts, settings
from stages.content_cache import ContentCache, file_key
from stages.encoder_runtime import Encoder, Runtime

if TYPE_CHECKING:  # Keras loads only where the keras runtime or training needs it
    from stages.quiet_start import keras

STAGE = "embed"
ROW_GROUP_ROWS = 65536  # images per Parquet row group: the most held in memory at once
TASK_BATCHES = 8  # batches encoded per task on a Dask worker
BAG_ROWS = 4096  # bags of words made dense at once


class EmbedParams(settings.Section):
    """params.yaml, section embed."""

    SECTION: ClassVar[str] = "embed"
    batch_size: int = Field(512, ge=1, description="images encoded per step")
    runtime: Runtime = Field(
        "litert",
        description="litert: the encoder converted once to LiteRT (no TensorFlow at run time) "
        "| keras: Keras itself (GPU workers)",
    )


def check_encoder_file(path: Path) -> None:
    """Stop, naming the file, when the encoder file is missing."""
    if not path.exists():
        raise common.UserError(f"{path} is missing: run `dvc repro train` first")


def check_image_shape(path: Path, expected: tuple[int, ...], image_shape: tuple[int, ...]) -> None:
    """Stop, naming the file, when the encoder takes other images than the pixels'."""
    if tuple(expected) != tuple(image_shape):
        raise common.UserError(
            f"{path} expects {expected[0]}x{expected[1]} images but the pixels are "
            f"{image_shape[0]}x{image_shape[1]}: rerun `dvc repro train` after changing image.*"
        )


def read_encoder(path: Path) -> keras.Model:
    """The Keras encoder of a file (TensorFlow loads)."""
    from stages.quiet_start import keras

    return keras.saving.load_model(path, compile=False)


def load_encoder(path: Path, image_shape: tuple[int, ...]) -> keras.Model:
    """Load the Keras encoder and check it takes images of `image_shape` (height, width, 3)
    (see encoder_runtime.open_encoder)."""
    return encoder_runtime.open_encoder(path, image_shape, "keras").model


def predict_padded(model: keras.Model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """A Keras model's float32 outputs for up to `batch_size` rows of pixels.

    The batch is always padded to `batch_size` rows: the backend may pick another
    algorithm for another batch size, with other rounding, and an image must get the
    same output whichever images it goes with (the caches rely on it).
    """
    images = encoder_runtime.padded_batch(pixels, batch_size)
    return np.asarray(model.predict_on_batch(images), dtype=np.float32)[: len(pixels)]


def embeddings_table(ids: list[str], codes: np.ndarray) -> pa.Table:
    """An (id, embedding) table with each embedding a fixed-size list of float32."""
    values = pa.array(codes.ravel(), type=pa.float32())
    embedding = pa.FixedSizeListArray.from_arrays(values, codes.shape[1])
    return pa.table({"id": pa.array(ids, type=pa.string()), "embedding": embedding})


@dataclass(frozen=True)
class EncodeTask:
    """Rows of the pixel file to encode, on a Dask worker (which reads the files)."""

    model_file: Path  # what the runtime loads (the encoder's `file`)
    descriptor_file: Path
    pixels_folder: Path
    rows: np.ndarray
    batch_size: int
    runtime: Runtime


def encode_task(task: EncodeTask) -> np.ndarray:
    """Encode a task's rows, batch by batch, as encode_missing does here."""
    encoder = compute.load_once(task.model_file, encoder_runtime.READERS[task.runtime])
    descriptor = compute.load_once(task.descriptor_file, descriptors.read_descriptor)
    pixels = parts.PartedArray(task.pixels_folder)
    batches = [
        task.rows[at : at + task.batch_size] for at in range(0, len(task.rows), task.batch_size)
    ]
    return np.concatenate(
        [descriptor.apply(encoder.encode(pixels[batch], task.batch_size)) for batch in batches]
    )


def store_vectors(
    cache: ContentCache, missing: list[str], blocks: Iterable[np.ndarray], dimension: int
) -> None:
    """Write the vectors of the `missing` files, block by block, as a new cache segment."""
    with (
        cache.new_segment(missing, {"embedding": ((dimension,), np.float32)}) as segment,
        common.progress_bar(len(missing), STAGE) as bar,
    ):
        start = 0
        for codes in blocks:
            segment.arrays["embedding"][start : start + len(codes)] = codes
            start += len(codes)
            bar.update(len(codes))


def encode_missing(
    encoder: Encoder,
    pixels: parts.PixelRows,
    sha256s: list[str],
    cache: ContentCache,
    batch_size: int,
    descriptor: descriptors.Descriptor,
    files: tuple[Path, Path] | None = None,
) -> int:
    """Encode the images whose vectors the cache lacks (each distinct file once) into a new
    segment of it; return how many were encoded.

    With a Dask scheduler (compute.scheduler) and the (descriptor, pixels) files, the
    workers encode (loading the encoder's file on its runtime), TASK_BATCHES batches a
    task; else this process does.
    """
    missing, rows = cache.missing_rows(sha256s)
    if not missing:
        return 0
    step = batch_size * TASK_BATCHES
    if compute.distributed() and files is not None:
        tasks = [
            EncodeTask(encoder.file, *files, rows[at : at + step], batch_size, encoder.runtime)
            for at in range(0, len(rows), step)
        ]
        blocks = compute.map_tasks(encode_task, tasks, workers=1)
    else:
        blocks = (
            descriptor.apply(encoder.encode(pixels[rows[at : at + batch_size]], batch_size))
            for at in range(0, len(rows), batch_size)
        )
    store_vectors(cache, missing, blocks, descriptor.dimension(encoder.values))
    return len(missing)


def check_vectors(ids: list[str], vectors: np.ndarray, constant_allowed: bool = False) -> None:
    """Stop on latent vectors that are not finite or constant (a broken weights file, say),
    naming the first images, rather than pass them on. A bag of words may be constant: an
    image without keypoints has none."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if constant_allowed:
        constant = np.zeros_like(bad)
    elif vectors.shape[1] > 1:
        constant = (vectors.max(axis=1) == vectors.min(axis=1)) & ~bad
    else:
        constant = bad
    for mask, what in ((bad, "not finite"), (constant, "constant")):
        if mask.any():
            named = ", ".join(ids[row] for row in np.flatnonzero(mask)[:5])
            raise common.UserError(
                f"{common.ENCODER_FILE} gave {int(mask.sum())} latent vectors that are {what} "
                f"(first: {named}): check the encoder's weights (`dvc repro train`), nothing "
                "was written"
            )


def write_embeddings(
    ids: list[str],
    sha256s: list[str],
    cache: ContentCache,
    dimension: int,
    path: Path,
    key: str,
    constant_allowed: bool = False,
) -> int:
    """Write the embeddings from the cache into the folder `path` as parts (see parts.py),
    each in row groups, atomically; each part's metadata names the key the vectors were
    made with. Only parts whose images changed are written; returns how many were."""
    schema = embeddings_table([], np.zeros((0, dimension), np.float32)).schema
    schema = schema.with_metadata({"embed_key": key})

    def write_part(part: Path, rows: slice) -> None:
        part_ids = ids[rows]
        with (
            common.atomic_output(part) as temporary,
            # No dictionary: vectors never repeat, and trying one costs a third of the write.
            pq.ParquetWriter(temporary, schema, use_dictionary=False) as writer,
        ):
            blocks = cache.row_blocks(sha256s[rows], "embedding", ROW_GROUP_ROWS)
            for start, codes in zip(range(0, len(part_ids), ROW_GROUP_ROWS), blocks):
                check_vectors(part_ids[start : start + len(codes)], codes, constant_allowed)
                writer.write_table(embeddings_table(part_ids[start : start + len(codes)], codes))

    named = parts.id_row_names(ids, sha256s)
    return parts.write_parts(path, ".parquet", key, named, write_part)


def embed_images(
    encoder: Encoder,
    pixels: parts.PixelRows,
    ids: list[str],
    sha256s: list[str],
    cache_folder: Path,
    path: Path,
    batch_size: int,
    descriptor: descriptors.Descriptor | None = None,
    files: tuple[Path, Path] | None = None,
) -> int:
    """Encode what `cache_folder` lacks and write every image's vector to `path`;
    return how many images were encoded. `descriptor` is what follows the encoder (none:
    its values as they are); `files` (the descriptor and pixel files) let Dask workers do
    the encoding (see encode_missing)."""
    descriptor = descriptor or descriptors.Descriptor()
    cache = ContentCache(cache_folder, ("embedding",))
    encoded = encode_missing(encoder, pixels, sha256s, cache, batch_size, descriptor, files)
    dimension = descriptor.dimension(encoder.values)
    write_embeddings(ids, sha256s, cache, dimension, path, cache_folder.name)
    return encoded


def bag_blocks(
    words: pd.DataFrame,
    keys: list[str],
    key_of: pd.Series,
    vocabulary: int,
    descriptor: descriptors.Descriptor,
) -> Iterator[np.ndarray]:
    """The vectors of the `keys` files' bags of words, BAG_ROWS at a time: counts times
    the train sample's idf, to unit length, through the scaling and PCA."""
    assert descriptor.idf is not None
    rows, word = descriptors.keypoint_rows(words, keys, key_of)
    for start in range(0, len(keys), BAG_ROWS):
        images = min(BAG_ROWS, len(keys) - start)
        low, high = np.searchsorted(rows, [start, start + images])
        inside = slice(low, high)
        counts = descriptors.count_matrix(rows[inside] - start, word[inside], images, vocabulary)
        yield descriptor.apply(descriptors.tf_idf(counts, descriptor.idf))


def embed_bags(
    ids: list[str],
    sha256s: list[str],
    read_words: Callable[[], pd.DataFrame],
    vocabulary: int,
    descriptor: descriptors.Descriptor,
    cache_folder: Path,
    path: Path,
) -> int:
    """encoder: bovw: make the bag-of-words vectors `cache_folder` lacks and write every
    image's to `path`; return how many were made. The words table (id, word) is read
    only when some are lacking. An image with no words (no keypoints, or unreadable) has
    the vector of an empty bag."""
    cache = ContentCache(cache_folder, ("embedding",))
    missing = cache.missing(sha256s)
    dimension = descriptor.dimension(vocabulary)
    if missing:
        # An exact copy has no words of its own (the words stage skips it): its file's
        # sha256 finds its original's.
        key_of = pd.Series(sha256s, index=ids)
        blocks = bag_blocks(read_words(), missing, key_of, vocabulary, descriptor)
        store_vectors(cache, missing, blocks, dimension)
    write_embeddings(ids, sha256s, cache, dimension, path, cache_folder.name, True)
    return len(missing)


def checked_words(descriptor: descriptors.Descriptor) -> tuple[str, int]:
    """The words' key and vocabulary size, checked to be those of the words describe
    counted (a vocabulary fitted again since needs a new idf)."""
    words_key, vocabulary = descriptors.words_made_with()
    if words_key != descriptor.words_key:
        raise common.UserError(
            f"{descriptors.DESCRIPTOR_FILE} was fitted on other visual words than "
            f"{common.WORDS_DIR} holds (the vocabulary or words params changed): run "
            "`dvc unfreeze describe && dvc repro`"
        )
    return words_key, vocabulary


def main() -> None:
    """Read params, the model files and the pixels (or the words); encode what the cache
    lacks; write the embeddings."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    all_params = settings.load_params()
    params = EmbedParams.from_params(all_params)
    batch_size = params.batch_size
    compute.use_params(all_params)
    spec = descriptors.read_spec()
    descriptor = descriptors.read_descriptor()
    ids, sha256s, pixels_key = common.read_image_keys()
    described = file_key(descriptors.DESCRIPTOR_FILE)
    if spec.get("encoder") == "bovw":
        words_key, vocabulary = checked_words(descriptor)
        cache_folder = common.CACHE_DIR / STAGE / f"bovw-{described}-{words_key}"
        encoded = embed_bags(
            ids,
            sha256s,
            lambda: descriptors.read_words()[0],
            vocabulary,
            descriptor,
            cache_folder,
            common.EMBEDDINGS_DIR,
        )
        what, dimension = f"bags of {vocabulary} visual words", descriptor.dimension(vocabulary)
    else:
        pixel_ids, pixels = parts.load_pixels()
        common.read_image_keys(pixel_ids)  # the same rows in the same order
        encoder = encoder_runtime.open_encoder(
            common.ENCODER_FILE, pixels.shape[1:], params.runtime
        )
        # The cache's name is its key: the model files' hashes, the runtime and prepare's
        # decode settings.
        runtime_key = encoder_runtime.runtime_key(params.runtime)
        cache_folder = (
            common.CACHE_DIR
            / STAGE
            / f"{file_key(common.ENCODER_FILE)}{runtime_key}-{described}-{pixels_key}"
        )
        files = (descriptors.DESCRIPTOR_FILE, common.PIXELS_DIR)
        encoded = embed_images(
            encoder,
            pixels,
            ids,
            sha256s,
            cache_folder,
            common.EMBEDDINGS_DIR,
            batch_size,
            descriptor,
            files,
        )
        what = f"runtime {params.runtime}"
        dimension = descriptor.dimension(encoder.values)
    seconds = time.perf_counter() - started
    logger.info(
        "%d images: %d encoded, %d from the cache; %d values each; %s; %.1f s "
        "(%.0f encoded images/s)",
        len(ids),
        encoded,
        len(set(sha256s)) - encoded,
        dimension,
        what,
        seconds,
        encoded / seconds if seconds else 0.0,
    )


if __name__ == "__main__":
    # Run the importable module's main, so that the tasks sent to a Dask cluster name
    # their functions stages.embed.*, which the cluster can import, not __main__.*.
    from stages import embed

    common.run_stage(embed.main)
