"""The visual patterns as a model: what the mine stage finds (models/patterns.parquet)
and how the patterns stage finds which images hold each pattern, so that with
`dvc freeze mine` a run looks only at its new images.

A pattern is a set of visual words, each with a weight (how many of the mined word sets
that make up the pattern hold it, as a share of their sum). An image holds a pattern
when its words carry at least `min_share` of that weight, and two of them at least; its
score is the share it carries. Whether an image holds a pattern depends on nothing but
the image's own words and the model, so the answer can be kept by image content.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field
from scipy import sparse

from stages import common, settings

MODEL_FILE = Path("models/patterns.parquet")
SIZE_STEP = 0.02  # the `size` weighting counts keypoint size in steps of this share
MAX_WEIGHT = 255  # an element's weight is capped: one word's copies in one image
SHARE_TOLERANCE = 1e-9  # shares are sums of float weights: 0.4 must hold at 0.39999...


class PatternsParams(settings.Section):
    """params.yaml, section patterns (mine uses the mining params, patterns the rest)."""

    SECTION: ClassVar[str] = "patterns"
    weighting: Literal["frequency", "size"] = Field(
        "frequency",
        description="a word's weight in an image: how often it occurs there, or the size "
        "of its keypoints",
    )
    tuple_size: int = Field(
        5, ge=1, le=16, description="min-hashes per tuple (r): more, stronger co-occurrence"
    )
    tables: int = Field(
        200, ge=1, le=10000, description="tables of tuples (l): more, weaker patterns found"
    )
    min_support: int = Field(5, ge=1, description="a pattern is kept when this many images hold it")
    min_share: float = Field(
        0.4, gt=0, le=1, description="an image holds a pattern with this share of its words"
    )
    max_word_share: float = Field(
        0.5, gt=0, le=1, description="words in more than this share of the images are left out"
    )
    merge_similarity: float = Field(
        0.8,
        gt=0,
        le=1,
        description="word sets held by images that overlap this much (the share of the "
        "fewer) are one pattern",
    )
    min_lift: float = Field(
        2.0,
        ge=0,
        description="a word set's pairs must co-occur this many times more often, on "
        "average, than independent words would",
    )
    reported: int = Field(20, ge=0, description="patterns with a mosaic in reports/patterns/")
    mosaic_side: int = Field(5, ge=1, le=20, description="images per side of a pattern's mosaic")
    sample: int = Field(
        100_000,
        ge=10,
        description="mine is fitted on at most this many images, a seeded sample by file "
        "content that keeps still as the collection grows (patterns looks at every image)",
    )
    seed: int = Field(0, ge=0, description="seed of the min-hashes and of the sample")


# ----------------------------------------------------------------------------- words of images


def image_rows(column: pd.Series, ids: list[str]) -> np.ndarray:
    """Each row's image row in `ids` (-1 for an image not there); a categorical column
    (as common.read_words_table gives) is looked up once per category."""
    index = pd.Index(ids)
    if isinstance(column.dtype, pd.CategoricalDtype):
        lookup = np.append(index.get_indexer(column.cat.categories), -1)
        return lookup[column.cat.codes.to_numpy()]  # code -1 (missing) takes the last
    return index.get_indexer(column.to_numpy())


def image_word_weights(table: pd.DataFrame, weighting: str) -> pd.DataFrame:
    """One row per (image row, word), by row then word: its weight (a whole number, 1 to
    MAX_WEIGHT). `table` has a `row` column. Summed as a sparse matrix: a pandas groupby
    took 5 s at 100,000 images."""
    rows = table["row"].to_numpy(np.int64)
    word = table["word"].to_numpy(np.int64)
    values = np.ones(len(rows)) if weighting == "frequency" else table["size"].to_numpy(float)
    shape = (int(rows.max()) + 1 if len(rows) else 0, int(word.max()) + 1 if len(word) else 0)
    summed = sparse.coo_matrix((values, (rows, word)), shape=shape).tocsr()
    summed.sum_duplicates()  # also sorts each row's words
    weight = summed.data if weighting == "frequency" else np.rint(summed.data / SIZE_STEP)
    return pd.DataFrame(
        {
            "row": np.repeat(np.arange(shape[0], dtype=np.int64), np.diff(summed.indptr)),
            "word": summed.indices.astype(np.int64),
            "weight": np.clip(weight, 1, MAX_WEIGHT).astype(np.int64),
        }
    )


def presence_matrix(weights: pd.DataFrame, images: int, vocabulary: int) -> sparse.csr_matrix:
    """Images x words: 1 where an image has a word (`weights` as image_word_weights gives,
    by row then word, so every caller sums the same numbers in the same order)."""
    return sparse.csr_matrix(
        (np.ones(len(weights)), (weights["row"].to_numpy(), weights["word"].to_numpy())),
        shape=(images, vocabulary),
    )


# ----------------------------------------------------------------------------- holders


def pattern_holders(
    presence: sparse.csr_matrix,
    words: list[np.ndarray],
    weights: list[np.ndarray],
    min_share: float,
) -> pd.DataFrame:
    """(row, column, score) of every image (row of `presence`) holding a pattern (column:
    its place in `words`): its words carry at least `min_share` of the pattern's weight,
    and two of them at least. By row, then column."""
    columns = np.repeat(np.arange(len(words)), [len(w) for w in words])
    members = np.concatenate(words).astype(np.int64) if words else np.zeros(0, np.int64)
    shape = (presence.shape[1], len(words))
    weight = sparse.csr_matrix(
        (np.concatenate(weights) if words else [], (members, columns)), shape
    )
    indicator = sparse.csr_matrix((np.ones(len(members)), (members, columns)), shape)
    shares = sparse.csr_matrix(presence @ weight).tocoo()
    counts = (presence @ indicator).tocsr()
    # (Indexing with no pairs gives an empty sparse matrix, not an array.)
    words_held = np.asarray(counts[shares.row, shares.col]).ravel() if shares.nnz else np.zeros(0)
    holds = (shares.data >= min_share - SHARE_TOLERANCE) & (words_held >= 2 - SHARE_TOLERANCE)
    found = pd.DataFrame(
        {"row": shares.row[holds], "column": shares.col[holds], "score": shares.data[holds]}
    )
    return found.sort_values(["row", "column"], kind="stable").reset_index(drop=True)


def image_patterns_table(
    ids: list[str], rows: np.ndarray, patterns: np.ndarray, scores: np.ndarray
) -> pd.DataFrame:
    """The image_patterns output (id, pattern, score), by pattern, then best score, then id.

    Sorted as numbers (an id by its rank among the ids) and the ids taken by Arrow: pandas
    sorting millions of id strings took most of a daily patterns run."""
    patterns = np.asarray(patterns, np.int32)
    scores = np.asarray(scores, np.float32)
    rows = np.asarray(rows, np.int64)
    id_rank = np.empty(len(ids), np.int64)
    id_rank[np.argsort(np.array(ids, dtype=str), kind="stable")] = np.arange(len(ids))
    order = np.lexsort((id_rank[rows], -scores, patterns))
    return pd.DataFrame(
        {
            "id": common.taken_strings(ids, rows[order]),
            "pattern": patterns[order],
            "score": scores[order],
        }
    )


# ----------------------------------------------------------------------------- the model file


def write_model(model: pd.DataFrame, words_key: str, path: Path = MODEL_FILE) -> None:
    """Write the mined patterns (pattern, words, weights, support) and the words' key."""
    common.write_parquet(model, path, keys={"words_key": words_key})


def read_model(words_key: str, path: Path = MODEL_FILE) -> pd.DataFrame:
    """The mined patterns, checked to be mined from the words `words_key` names."""
    model = common.read_parquet(path, made_by="mine")
    mined_from = common.parquet_keys(path, made_by="mine").get("words_key", "")
    if mined_from != words_key:
        raise common.UserError(
            f"{path} was mined from other visual words ({mined_from or 'unknown'}, now "
            f"{words_key}): run `dvc unfreeze mine && dvc repro mine`"
        )
    return model
