"""similar: the collection's images most like a given image file (a command, not a stage).

    python -m stages.similar path/to/image.jpg [--top 10]

The file is decoded as prepare decodes the collection, encoded with the trained encoder
(models/autoencoder/encoder.keras), and compared with every image's vector in
data/processed/embeddings/, read a block at a time: an exact search whose memory
stays bounded at any collection size. Each line gives the rank, the distance in the
latent space, the image's id and its path, its cluster and its near-duplicate group when
the pipeline has made them. An image of the collection finds itself first, at distance 0.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from stages import common, descriptors, embed, encoder_runtime, images, prepare, settings, words

STAGE = "similar"
SEARCH_BLOCK = 65536  # collection vectors compared at once


def prepared_pixels(path: Path, params: dict) -> np.ndarray:
    """One image file decoded as prepare decodes the collection (the model's input)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise common.UserError(f"cannot read {path}: {error.strerror or error}") from None
    sizes = prepare.DecodeSizes.from_params(params)
    try:
        return images.decode_for_targets(data, sizes.targets)[0]
    except Exception as error:  # not an image, or a damaged one
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise common.UserError(f"cannot decode {path}: {message}") from None


def image_vector(path: Path, params: dict) -> np.ndarray:
    """The vector of one image file, made as embed makes the collection's: encoded by the
    encoder, or as its bag of visual words (bovw); then scaled and projected as describe
    fitted."""
    descriptor = descriptors.read_descriptor()
    if descriptors.read_spec().get("encoder") == "bovw":
        return bag_vector(path, params, descriptor)
    pixels = prepared_pixels(path, params)
    runtime = embed.EmbedParams.from_params(params).runtime
    encoder = encoder_runtime.open_encoder(common.ENCODER_FILE, pixels.shape, runtime)
    return descriptor.apply(encoder.encode(pixels[None], 1))[0]


def image_keypoints(path: Path, params: dict, words_params: words.WordsParams) -> words.Keypoints:
    """One image file's keypoints, found as the words stage finds them."""
    if words_params.detector == "encoder":
        from stages import encoder_cells  # Keras's feature map of the encoder

        pixels = prepared_pixels(path, params)[None]
        return encoder_cells.pixel_keypoints(pixels, np.arange(1), words_params.max_keypoints)[0]
    found = words.image_keypoints(path, words_params)
    if isinstance(found, str):
        raise common.UserError(found)
    return found


def bag_vector(path: Path, params: dict, descriptor: descriptors.Descriptor) -> np.ndarray:
    """The bag-of-words vector of one image file."""
    words_params = words.WordsParams.from_params(params)
    if descriptor.words_key != words.words_key(words_params):
        raise common.UserError(
            f"{descriptors.DESCRIPTOR_FILE} was fitted on other visual words than the "
            "vocabulary and words params make now: run `dvc repro`"
        )
    centers = words.read_vocabulary(words_params)
    found = image_keypoints(path, params, words_params)
    word = words.nearest_words(found.descriptors, centers)
    counts = descriptors.count_matrix(np.zeros(len(word), np.int64), word, 1, len(centers))
    assert descriptor.idf is not None
    return descriptor.apply(descriptors.tf_idf(counts, descriptor.idf))[0]


def nearest_rows(vector: np.ndarray, top: int) -> list[tuple[float, int]]:
    """(distance, row) of the `top` embeddings nearest `vector`, nearest first, ties by row."""
    best: list[tuple[float, int]] = []
    start = 0
    for block in common.embedding_batches(common.EMBEDDINGS_DIR, SEARCH_BLOCK):
        distances = np.sqrt(((block.astype(np.float64) - vector) ** 2).sum(axis=1))
        candidates = np.argsort(distances, kind="stable")[:top]
        best = heapq.nsmallest(
            top, best + [(float(distances[row]), start + int(row)) for row in candidates]
        )
        start += len(block)
    return best


def describe(rows: list[tuple[float, int]]) -> pd.DataFrame:
    """The found rows with id, path, cluster and near-duplicate group where known."""
    ids = common.embedding_ids()
    table = pd.DataFrame(
        {
            "rank": range(1, len(rows) + 1),
            "distance": [round(distance, 6) for distance, _ in rows],
            "id": [ids[row] for _, row in rows],
        }
    )
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync").set_index("id")
    table["path"] = manifest["path"].reindex(table["id"]).to_numpy()
    for path, column, stage in (
        (common.CLUSTERS_FILE, "cluster", "assign"),
        (common.PROCESSED_DIR / "health.parquet", "near_group", "health"),
    ):
        if path.exists():
            values = common.read_parquet(path, made_by=stage).set_index("id")[column]
            table[column] = values.reindex(table["id"]).to_numpy()
    return table


def main(arguments: list[str] | None = None) -> None:
    """Print the collection's images most like the given file."""
    parser = argparse.ArgumentParser(prog="python -m stages.similar", description=__doc__)
    parser.add_argument("image", type=Path, help="an image file")
    parser.add_argument("--top", type=int, default=10, help="how many to list (default 10)")
    options = parser.parse_args(arguments)
    if options.top < 1:
        raise common.UserError(f"--top {options.top}: give at least 1")
    if not common.EMBEDDINGS_DIR.exists():
        raise common.UserError(f"{common.EMBEDDINGS_DIR} is missing: run `dvc repro embed`")
    vector = image_vector(options.image, settings.load_params())
    table = describe(nearest_rows(vector, options.top))
    sys.stdout.write(table.to_string(index=False) + "\n")


if __name__ == "__main__":
    common.run_stage(main)
