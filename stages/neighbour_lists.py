"""Every image's nearest neighbours in the latent space, kept between runs so that a run
searches only what is new (the health stage's neighbours and how unusual each image is).

The lists of the last run are kept in data/cache/health/neighbours.parquet with each
image's id and a digest of its latent vector. The next run takes them for every image
whose vector is unchanged, searches the new and changed images exactly against the whole
collection, and merges them into the others' lists (near_search.updated_neighbours).
Below `exact_below` images the lists equal a fresh exact search; beyond, the first lists
come from an approximate index and every later pair with a new image is exact. A run that
finds no usable lists (none yet, other params, more than half the images new) searches
everything, as near_search.nearest_neighbours does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stages import common, near_search

CACHE_FILE = common.CACHE_DIR / "health" / "neighbours.parquet"
# Bump when the lists would come out differently for the same vectors.
LISTS_VERSION = "neighbours-1"


@dataclass(frozen=True)
class SearchSettings:
    """What the lists depend on besides the vectors."""

    k: int
    exact_below: int
    seed: int

    def keys(self) -> dict[str, str]:
        """The settings as the cache file's metadata."""
        return {
            "lists_version": LISTS_VERSION,
            "k": str(self.k),
            "exact_below": str(self.exact_below),
            "seed": str(self.seed),
        }


def vector_digests(vectors: np.ndarray) -> np.ndarray:
    """An 8-byte digest of each row's bytes, as unsigned integers."""
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
            for row in rows
        ],
        dtype=np.uint64,
    )


def read_cached_lists(
    path: Path, settings: SearchSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The last run's ids, digests, indices (into its own rows) and distances, or None when
    there are none or they were made with other settings."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        keys = {key.decode(): value.decode() for key, value in metadata.items()}
        if any(keys.get(key) != value for key, value in settings.keys().items()):
            return None
        table = pq.read_table(path)
    except (OSError, ValueError):
        return None
    k = settings.k
    indices = np.stack([table[f"n{i}"].to_numpy() for i in range(k)], axis=1).astype(np.int64)
    distances = np.stack([table[f"d{i}"].to_numpy() for i in range(k)], axis=1)
    return (
        table["id"].to_numpy(zero_copy_only=False).astype(str),
        table["digest"].to_numpy().astype(np.uint64),
        indices.reshape(len(table), k),
        distances.astype(np.float32).reshape(len(table), k),
    )


def write_cached_lists(
    path: Path,
    settings: SearchSettings,
    ids: list[str],
    digests: np.ndarray,
    indices: np.ndarray,
    distances: np.ndarray,
) -> None:
    """Keep this run's lists for the next one (one flat column per neighbour)."""
    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.string()),
        "digest": pa.array(digests, pa.uint64()),
    }
    for i in range(settings.k):
        columns[f"n{i}"] = pa.array(indices[:, i], pa.int64())
    for i in range(settings.k):
        columns[f"d{i}"] = pa.array(distances[:, i], pa.float32())
    table = pa.table(columns)
    common.write_arrow_parquet(
        table.replace_schema_metadata({k.encode(): v.encode() for k, v in settings.keys().items()}),
        path,
    )


def earlier_lists_in_rows(
    ids: list[str], digests: np.ndarray, cached: tuple[np.ndarray, ...], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cached lists moved to the current rows: indices, distances, and which rows are
    new (absent from the cache or with another vector). A neighbour that left or changed
    becomes -1, so its row is searched again."""
    cached_ids, cached_digests, cached_indices, cached_distances = cached
    place = pd.Index(cached_ids).get_indexer(ids)  # cached row of each current row, or -1
    known = place >= 0
    known[known] = cached_digests[place[known]] == digests[known]
    current_of_cached = np.full(len(cached_ids), -1, dtype=np.int64)
    current_of_cached[place[known]] = np.flatnonzero(known)
    indices = np.full((len(ids), k), -1, dtype=np.int64)
    distances = np.full((len(ids), k), np.inf, dtype=np.float32)
    rows = np.flatnonzero(known)
    old = cached_indices[place[rows]]
    indices[rows] = np.where(old >= 0, current_of_cached[np.maximum(old, 0)], -1)
    distances[rows] = cached_distances[place[rows]]
    return indices, distances, ~known


def neighbour_lists(
    ids: list[str],
    vectors: np.ndarray,
    settings: SearchSettings,
    workers: int,
    cache_file: Path = CACHE_FILE,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Each row's k nearest other rows (indices, distances, nearest first) and how many
    rows were searched (see the module docstring); the lists are kept for the next run."""
    digests = vector_digests(vectors)
    cached = read_cached_lists(cache_file, settings)
    count = len(ids)
    if cached is not None and count >= 2:
        indices, distances, new = earlier_lists_in_rows(ids, digests, cached, settings.k)
        if new.sum() * 2 > count:
            cached = None
    if cached is None or count < 2:
        indices, distances = near_search.padded(
            *near_search.nearest_neighbours(
                vectors, settings.k, settings.exact_below, settings.seed, workers
            ),
            settings.k,
        )
        searched = count
    else:
        indices, distances, searched = near_search.updated_neighbours(
            vectors, indices, distances, new, workers
        )
    write_cached_lists(cache_file, settings, ids, digests, indices, distances)
    return indices, distances, searched
