"""describe: fit, once, what turns the encoder's values into every image's stored vector.

Params:  DescribeParams below (params.yaml, section describe); embed.EmbedParams (the
         sample is encoded as embed encodes every image)
Inputs:  models/autoencoder/ (spec.json; encoder.keras unless train.encoder is bovw),
         data/interim/pixels/, data/interim/ids.parquet, data/processed/split.parquet,
         data/processed/words/ (bovw)
Outputs: models/descriptor.npz (see stages/descriptors.py), metrics/describe.json

Everything is fitted on a seeded sample of the `train` subset, each file once. For
`train.encoder: bovw` an image is its bag of visual words: the sample gives each word's
inverse document frequency. For every encoder the values may then be scaled
(`scaling`) and reduced by PCA (`pca`), as the 416,000-car project found best before
clustering. Kept apart from train so that trying a scaling or a PCA never retrains the
autoencoder; like train, it is frozen for daily runs (`dvc freeze describe`).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from stages import common, descriptors, embed, encoder_runtime, parts, settings

STAGE = "describe"
METRICS_FILE = common.METRICS_DIR / "describe.json"
PCA_ALLOWED = (
    "expected null, a share of the variance above 0 and below 1, or a number of components >= 1"
)


class DescribeParams(settings.Section):
    """params.yaml, section describe."""

    SECTION: ClassVar[str] = "describe"
    scaling: Literal["none", "minmax", "standard"] = Field(
        "none",
        description="none | minmax: each value to 0..1 | standard: each value to mean 0, "
        "standard deviation 1",
    )
    pca: int | float | None = Field(
        None,
        description="null: no PCA | a share between 0 and 1: the fewest components keeping "
        "that share of the variance | an integer: that many components",
        json_schema_extra={"allowed": PCA_ALLOWED},
    )
    sample: int = Field(
        5000, ge=2, description="fit on at most this many images of the train subset (seeded)"
    )
    seed: int = Field(42, ge=0, description="seed of the sample and the PCA")

    @field_validator("pca")
    @classmethod
    def share_or_count(cls, value: int | float | None) -> int | float | None:
        """A float is a share of the variance (0 < share < 1), an integer a count (>= 1)."""
        share = isinstance(value, float) and 0 < value < 1
        count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if value is not None and not share and not count:
            raise ValueError(PCA_ALLOWED)
        return value


def sample_rows(
    split: pd.DataFrame, ids: list[str], sha256s: list[str], params: DescribeParams
) -> np.ndarray:
    """Rows of a seeded sample of the train subset's files (each file once), in row order."""
    subset = split.set_index("id")["subset"].reindex(ids).to_numpy()
    if pd.isna(subset).any():
        raise common.UserError("the split does not cover every image: run `dvc repro split`")
    _, first = np.unique(np.asarray(sha256s), return_index=True)
    rows = np.sort(first[subset[first] == "train"])
    if len(rows) == 0:
        raise common.UserError(
            "the train subset is empty: raise split.proportions.train or add images"
        )
    return rows[common.sample_rows(len(rows), params.sample, params.seed)]


def encoded_values(rows: np.ndarray, encoding: embed.EmbedParams) -> np.ndarray:
    """The encoder's values of the given pixel rows, as embed encodes them (on its runtime,
    in its batches)."""
    _, pixels = parts.load_pixels()
    encoder = encoder_runtime.open_encoder(common.ENCODER_FILE, pixels.shape[1:], encoding.runtime)
    batch = encoding.batch_size
    blocks = [
        encoder.encode(pixels[rows[at : at + batch]], batch) for at in range(0, len(rows), batch)
    ]
    return np.concatenate(blocks)


def bag_values(
    ids: list[str], sha256s: list[str], rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """The sample's TF-IDF bags of words, the idf, the words' key and counts for the
    metrics."""
    table, words_key, vocabulary = descriptors.read_words()
    keys = [sha256s[row] for row in rows]
    counts = descriptors.word_counts(table, keys, pd.Series(sha256s, index=ids), vocabulary)
    idf = descriptors.inverse_document_frequency(counts)
    facts = {
        "vocabulary": vocabulary,
        "images_without_words": int((counts.getnnz(axis=1) == 0).sum()),
    }
    return descriptors.tf_idf(counts, idf), idf, words_key, facts


def describe_metrics(
    descriptor: descriptors.Descriptor, images: int, values: int, facts: dict[str, Any]
) -> dict[str, Any]:
    """metrics/describe.json: the sample, the sizes in and out, the share of the variance
    kept."""
    # Without PCA every value is kept, and all of the variance: 1, not null, which
    # `dvc metrics show` cannot print.
    explained = 1.0 if descriptor.explained is None else round(descriptor.explained, 6)
    return {
        "images": images,
        "input_dimension": values,  # not "values": that name breaks `dvc metrics show`
        "dimension": descriptor.dimension(values),
        "explained_variance": explained,
        **facts,
    }


def main() -> None:
    """Read the spec, the sample's values (encoded, or counted from the words); fit; write
    the descriptor and its metrics."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    all_params = settings.load_params()
    params = DescribeParams.from_params(all_params)
    spec = descriptors.read_spec()
    ids, sha256s, _ = common.read_image_keys()
    split = common.read_parquet(common.SPLIT_FILE, made_by="split")
    rows = sample_rows(split, ids, sha256s, params)
    idf, words_key, facts = None, None, {}
    if spec.get("encoder") == "bovw":
        values, idf, words_key, facts = bag_values(ids, sha256s, rows)
        width = values.shape[1]
    elif params.scaling == "none" and params.pca is None:
        values, width = np.zeros((0, 0), np.float32), int(spec["latent_dim"])
    else:
        values = encoded_values(rows, embed.EmbedParams.from_params(all_params))
        width = values.shape[1]
    descriptor = descriptors.fit_descriptor(
        values, params.scaling, params.pca, params.seed, idf, words_key
    )
    descriptors.write_descriptor(descriptor)
    metrics = describe_metrics(descriptor, len(rows), width, facts)
    common.write_json(metrics, METRICS_FILE)
    logger.info(
        "%s of %d train images: %d values each, %d stored (scaling %s, %s of the variance "
        "kept); %.1f s",
        "bags of words" if idf is not None else f"{spec.get('encoder')} vectors",
        len(rows),
        width,
        metrics["dimension"],
        params.scaling,
        "all" if descriptor.explained is None else f"{descriptor.explained:.3f}",
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
