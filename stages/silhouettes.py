"""Silhouettes of many images against a fixed reference, kept by image content.

The silhouette of an image compares its mean latent distance to its own cluster (a) with
that to the nearest other cluster (b): s = (b - a) / max(a, b). The means run over a
reference, the cluster fit sample, so the cost is N x reference, not N x N, and an
image's value depends on its vector, its cluster and the reference alone: with frozen
models it never changes, and data/cache/score/ keeps it by file sha256.
"""

from __future__ import annotations

import hashlib

import numpy as np

from stages import common
from stages.content_cache import ContentCache

CACHE_FOLDER = common.CACHE_DIR / "score"
DISTANCE_BLOCK = 256  # images whose distances to the reference are held at once


def reference_rows(
    clusters: np.ndarray, fitted: np.ndarray, sha256s: list[str], size: int, seed: int
) -> np.ndarray:
    """The rows silhouettes are measured against, in row order: the clustered images of the
    cluster fit sample (every clustered image when no row is flagged `fitted`), at most
    `size` of them.

    Beyond `size`, the images whose seeded hash of their file's sha256 ranks lowest are
    kept (ties by row), so the choice depends on the images, never on the order they
    arrived in; and with frozen models new images never change it, which lets every
    earlier silhouette stay as it was.
    """
    clustered = clusters != common.NOISE
    candidates = np.flatnonzero(clustered & fitted)
    if not len(candidates):
        candidates = np.flatnonzero(clustered)
    return candidates[common.content_sample([sha256s[row] for row in candidates], size, seed)]


def silhouette_per_image(
    vectors: np.ndarray,
    clusters: np.ndarray,
    reference: np.ndarray,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """The silhouettes of `rows` (every row by default) against the `reference` rows; NaN
    for noise and when the reference holds fewer than 2 clusters.

    a = mean distance to the other members of its cluster, b = the lowest mean distance to
    the members of another cluster, s = (b - a) / max(a, b), and 0 for a cluster of one
    (as scikit-learn). The means run over the reference, so the cost is rows x reference,
    not N x N, and a row's value depends on its vector, its cluster and the reference
    alone; with every clustered image in the reference it equals scikit-learn's
    silhouette_samples.
    """
    rows = np.arange(len(vectors)) if rows is None else rows
    result = np.full(len(rows), np.nan)
    labels, reference_label = np.unique(clusters[reference], return_inverse=True)
    if len(labels) < 2:
        return result
    clustered = np.flatnonzero(clusters[rows] != common.NOISE)
    members = np.zeros((len(reference), len(labels)))
    members[np.arange(len(reference)), reference_label] = 1.0
    counts = members.sum(axis=0)
    in_reference = np.zeros(len(vectors), dtype=bool)
    in_reference[reference] = True
    reference_vectors = vectors[reference].astype(np.float64)
    reference_norms = (reference_vectors**2).sum(axis=1)
    # Two block-sized arrays for every block, filled in place: a fresh one costs its page
    # faults (a third of a second for 1,000 x 20,000 here). The arithmetic is that of
    # sqrt(max(|a|^2 + |b|^2 - 2ab, 0)), bit for bit.
    shape = (min(DISTANCE_BLOCK, max(len(clustered), 1)), len(reference))
    doubled_block, distance_block = np.empty(shape), np.empty(shape)
    for start in range(0, len(clustered), DISTANCE_BLOCK):
        places = clustered[start : start + DISTANCE_BLOCK]
        block_rows = rows[places]
        block = vectors[block_rows].astype(np.float64)
        doubled = np.matmul(block, reference_vectors.T, out=doubled_block[: len(block)])
        doubled *= 2.0
        squared = (block**2).sum(axis=1)[:, None]
        distances = np.add(squared, reference_norms[None, :], out=distance_block[: len(block)])
        distances -= doubled
        np.maximum(distances, 0.0, out=distances)
        np.sqrt(distances, out=distances)
        # An image in the reference has distance 0 to itself; taking it out of its own
        # cluster's count leaves the mean over the others. A cluster the reference lacks
        # has no column: its images get 0, as a cluster of one.
        sums = np.hstack([distances @ members, np.zeros((len(block_rows), 1))])
        column = np.searchsorted(labels, clusters[block_rows])
        found = labels[np.minimum(column, len(labels) - 1)]
        absent = (column >= len(labels)) | (found != clusters[block_rows])
        own = np.where(absent, len(labels), column)
        own_count = np.append(counts, 0.0)[own] - in_reference[block_rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums[:, :-1] / counts[None, :]
            a = sums[np.arange(len(block_rows)), own] / own_count
        means[np.arange(len(block_rows))[~absent], own[~absent]] = np.inf
        b = means.min(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            silhouettes = (b - a) / np.maximum(a, b)
        silhouettes[own_count <= 0] = 0.0
        silhouettes[(a == 0) & (b == 0)] = 0.0
        result[places] = silhouettes
    return result


def cached_silhouettes(
    vectors: np.ndarray,
    clusters: np.ndarray,
    reference: np.ndarray,
    sha256s: list[str],
    cache_key: str | None,
) -> tuple[np.ndarray, int]:
    """Every image's silhouette, and how many were computed: those data/cache/score/ lacks
    for `cache_key` (what placed every image and the reference's files), each distinct
    file once. Without a key every silhouette is computed and nothing is kept."""
    if cache_key is None:
        return silhouette_per_image(vectors, clusters, reference), len(vectors)
    cache = ContentCache(CACHE_FOLDER / cache_key, ("silhouette",))
    missing, rows = cache.missing_rows(sha256s)
    if missing:
        computed = silhouette_per_image(vectors, clusters, reference, rows)
        cache.add(missing, {"silhouette": computed})
    blocks = cache.row_blocks(sha256s, "silhouette")
    return np.concatenate([np.empty(0), *blocks]), len(missing)


def silhouette_cache_key(assign_key: str | None, reference_sha256s: list[str]) -> str | None:
    """The name of the silhouette cache: a digest of what placed every image (assign's key,
    which names the cluster model and the embeddings) and of the reference's files."""
    if not assign_key:
        return None
    digest = hashlib.sha256(assign_key.encode())
    digest.update("\n".join(reference_sha256s).encode())
    return digest.hexdigest()[:16]
