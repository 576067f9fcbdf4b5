"""What an image's stored vector is made of after the encoder (the describe stage fits it,
embed applies it): for `train.encoder: bovw` its bag of visual words, TF-IDF weighted; for
every encoder the scaling, then the PCA, of `describe.scaling` and `describe.pca`.

models/descriptor.npz holds what describe fitted, each part absent when unused:
  idf                          bovw: each word's inverse document frequency
  words_key                    bovw: the words it was counted on (vocabulary and detector)
  offset, factor               scaling: x -> (x - offset) / factor
  pca_mean, pca_components     PCA: x -> (x - pca_mean) @ pca_components.T
  explained                    the share of the variance the PCA keeps

This module needs neither Keras nor the words' detector: embed, describe and the similar
command share it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from stages import common

DESCRIPTOR_FILE = Path("models/descriptor.npz")
SPEC_FILE = common.AUTOENCODER_DIR / "spec.json"


@dataclass(frozen=True)
class Descriptor:
    """The fitted steps between the encoder's (or the bag's) values and the stored vector."""

    idf: np.ndarray | None = None
    words_key: str | None = None
    offset: np.ndarray | None = None
    factor: np.ndarray | None = None
    pca_mean: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    explained: float | None = None

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Scaled and projected float32 rows of `values` (the encoder's or the bags')."""
        vectors = np.asarray(values, dtype=np.float32)
        if self.offset is not None and self.factor is not None:
            vectors = (vectors - self.offset) / self.factor
        if self.pca_mean is not None and self.pca_components is not None:
            vectors = (vectors - self.pca_mean) @ self.pca_components.T
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def dimension(self, values: int) -> int:
        """The stored vector's size for `values` input values."""
        return values if self.pca_components is None else len(self.pca_components)


def fit_scaling(values: np.ndarray, scaling: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(offset, factor) of a scaling fitted on `values`; a constant value keeps factor 1."""
    if scaling == "none":
        return None, None
    values = values.astype(np.float64)
    if scaling == "minmax":
        offset, spread = values.min(axis=0), values.max(axis=0) - values.min(axis=0)
    else:
        offset, spread = values.mean(axis=0), values.std(axis=0)
    factor = np.where(spread > 0, spread, 1.0)
    return offset.astype(np.float32), factor.astype(np.float32)


def fit_pca(
    vectors: np.ndarray, pca: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, components, explained share) of a PCA of `vectors`: `pca` components, or
    the fewest that explain the share `pca` of the variance. A count beyond what the
    vectors have keeps them all."""
    from sklearn.decomposition import PCA

    most = min(vectors.shape)
    if most < 2:
        raise common.UserError(
            f"describe.pca needs at least 2 images and 2 values; the sample "
            f"has {vectors.shape[0]} images of {vectors.shape[1]} values"
        )
    components = min(pca, most) if isinstance(pca, int) else pca
    model = PCA(n_components=components, svd_solver="full", random_state=seed)
    model.fit(vectors.astype(np.float64))
    explained = float(model.explained_variance_ratio_.sum())
    return model.mean_.astype(np.float32), model.components_.astype(np.float32), explained


def fit_descriptor(
    values: np.ndarray,
    scaling: str,
    pca: int | float | None,
    seed: int,
    idf: np.ndarray | None = None,
    words_key: str | None = None,
) -> Descriptor:
    """The scaling and then PCA asked for, fitted on `values` (the sample's); `idf` and
    `words_key` are kept as they are (bovw)."""
    offset, factor = fit_scaling(values, scaling)
    if pca is None:
        return Descriptor(idf, words_key, offset, factor)
    scaled = Descriptor(idf, words_key, offset, factor).apply(values)
    mean, components, explained = fit_pca(scaled, pca, seed)
    return Descriptor(idf, words_key, offset, factor, mean, components, explained)


def write_descriptor(descriptor: Descriptor, path: Path = DESCRIPTOR_FILE) -> None:
    """Save the fitted parts (absent ones left out) as .npz, atomically."""
    arrays = {
        field.name: np.asarray(getattr(descriptor, field.name))
        for field in fields(descriptor)
        if getattr(descriptor, field.name) is not None
    }
    with common.atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.savez(file, **arrays)  # numpy stamps a fixed date: the bytes depend on the arrays


def read_descriptor(path: Path = DESCRIPTOR_FILE) -> Descriptor:
    """The Descriptor train saved."""
    if not path.exists():
        raise common.UserError(f"{path} is missing: run `dvc repro describe` first")
    with np.load(path) as stored:
        parts = {name: stored[name] for name in stored.files}
    if "explained" in parts:
        parts["explained"] = float(parts["explained"])
    if "words_key" in parts:
        parts["words_key"] = str(parts["words_key"])
    return Descriptor(**parts)


def read_spec() -> dict[str, Any]:
    """What train made (models/autoencoder/spec.json): the encoder's kind and sizes."""
    if not SPEC_FILE.exists():
        raise common.UserError(f"{SPEC_FILE} is missing: run `dvc repro train` first")
    return json.loads(SPEC_FILE.read_text())


# ----------------------------------------------------------------------------- bags of words


def words_made_with(path: Path = common.WORDS_DIR) -> tuple[str, int]:
    """The key of what made the words (vocabulary file and detector params) and the
    vocabulary's size, from the words file's metadata alone."""
    keys = common.parquet_keys(path, made_by="words")
    if "words_key" not in keys or "vocabulary" not in keys:
        raise common.UserError(f"{path} was written by an older version: run `dvc repro words`")
    return keys["words_key"], int(keys["vocabulary"])


def read_words(path: Path = common.WORDS_DIR) -> tuple[pd.DataFrame, str, int]:
    """The words table's (id, word) columns, with words_made_with's key and size."""
    words_key, vocabulary = words_made_with(path)
    return common.read_words_table(path, ["id", "word"]), words_key, vocabulary


def keypoint_rows(
    words: pd.DataFrame, keys: list[str], key_of: pd.Series
) -> tuple[np.ndarray, np.ndarray]:
    """(row, word) of every keypoint of the `keys` files' images, by row: `words` has one
    row per keypoint (id, word), `key_of` maps an id to its key (a file's sha256, so exact
    copies share their original's bag); a keypoint of another image is left out."""
    row_of = pd.Series(np.arange(len(keys)), index=pd.Index(keys))
    rows = row_of.reindex(key_of.reindex(words["id"]).to_numpy()).to_numpy()
    known = ~np.isnan(rows)
    rows, word = rows[known].astype(np.int64), words["word"].to_numpy()[known].astype(np.int64)
    order = np.argsort(rows, kind="stable")
    return rows[order], word[order]


def count_matrix(rows: np.ndarray, word: np.ndarray, images: int, size: int) -> sparse.csr_matrix:
    """(images, size) counts of each word in each image, from (row, word) pairs."""
    ones = np.ones(len(rows), np.float32)
    return sparse.coo_matrix((ones, (rows, word)), shape=(images, size)).tocsr()


def word_counts(
    words: pd.DataFrame, keys: list[str], key_of: pd.Series, size: int
) -> sparse.csr_matrix:
    """(len(keys), size) counts of each word in each key's image (see keypoint_rows); a
    key with no words is a row of zeros."""
    return count_matrix(*keypoint_rows(words, keys, key_of), len(keys), size)


def inverse_document_frequency(counts: sparse.csr_matrix) -> np.ndarray:
    """Each word's idf over the images of `counts`: log((1 + n) / (1 + df)) + 1, as
    scikit-learn's smoothed TF-IDF, so a word no image holds still has a finite weight."""
    images = counts.shape[0]
    holding = np.bincount(counts.indices, minlength=counts.shape[1])
    return (np.log((1.0 + images) / (1.0 + holding)) + 1.0).astype(np.float32)


def tf_idf(counts: sparse.csr_matrix, idf: np.ndarray) -> np.ndarray:
    """Dense float32 rows: each image's word counts times idf, to unit length (an image
    with no words stays all zeros)."""
    weighted = np.asarray(counts.multiply(idf[None, :]).todense(), dtype=np.float64)
    norms = np.sqrt((weighted**2).sum(axis=1, keepdims=True))
    return (weighted / np.where(norms > 0, norms, 1.0)).astype(np.float32)
