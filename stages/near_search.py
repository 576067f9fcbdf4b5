"""Searches for near images, shared by the duplicates, split, health and similar steps:
perceptual-hash pairs within a Hamming distance, nearest neighbours in the latent space,
and the groups that pairs join.

Every search is exact up to `exact_below` images and deterministic: ties are broken by row.
Beyond it, nearest neighbours come from an approximate index (pynndescent, seeded), so that
a million images stay feasible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from stages import common

BLOCK_CELLS = 2**22  # (row, other row) distances held at once by one process: 32 MiB


def block_rows(count: int) -> int:
    """Rows per block when each row is measured against `count` rows (see BLOCK_CELLS)."""
    return max(1, BLOCK_CELLS // max(count, 1))


def hash_values(hexes: Sequence[str]) -> np.ndarray:
    """16-hex-digit hashes as unsigned 64-bit integers."""
    return np.array([int(text, 16) for text in hexes], dtype=np.uint64)


def hash_distance(first: str, second: str) -> int:
    """The Hamming distance of two 16-hex-digit hashes."""
    return (int(first, 16) ^ int(second, 16)).bit_count()


def hash_pair_block(
    task: tuple[np.ndarray, np.ndarray, np.ndarray, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs (row, other row > row) within `limit` among rows [start, start + block):
    each row's hash and its mirror's against every later hash (a task for a process).

    Returns rows, others, distances and whether the mirror was the nearer.
    """
    hashes, mirrors, usable, start, limit = task
    stop = min(start + block_rows(len(hashes)), len(hashes))
    block = np.arange(start, stop)
    later = np.arange(start + 1, len(hashes))
    if not len(later):
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.uint8), np.empty(0, dtype=bool)
    plain = np.bitwise_count(hashes[block, None] ^ hashes[None, later])
    mirrored = np.bitwise_count(mirrors[block, None] ^ hashes[None, later])
    nearest = np.minimum(plain, mirrored)
    # only pairs (row, other) with other > row, between usable images
    mask = (later[None, :] > block[:, None]) & (nearest <= limit)
    mask &= usable[block][:, None] & usable[later][None, :]
    rows, columns = np.nonzero(mask)
    return (
        block[rows].astype(np.int64),
        later[columns].astype(np.int64),
        nearest[rows, columns].astype(np.uint8),
        mirrored[rows, columns] < plain[rows, columns],
    )


def hash_pairs(
    hashes: np.ndarray, mirrors: np.ndarray, usable: np.ndarray, limit: int, workers: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of usable rows (a < b) whose hashes are within `limit` bits, either as they
    are or with one mirrored: rows a, rows b, distance, mirrored. Exact, in blocks of rows
    on `workers` processes; row order."""
    step = block_rows(len(hashes))
    tasks = [(hashes, mirrors, usable, start, limit) for start in range(0, len(hashes), step)]
    parts = list(common.map_in_processes(hash_pair_block, tasks, workers))
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.uint8), np.empty(0, dtype=bool)
    return tuple(np.concatenate([part[index] for part in parts]) for index in range(4))  # type: ignore[return-value]


def groups_of_pairs(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The group of each of `count` rows: the connected components of the pairs, numbered
    by their smallest row (a row in no pair is alone in its own group)."""
    graph = coo_matrix((np.ones(len(first), dtype=np.int8), (first, second)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1 if count else 0, count, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(count))
    return smallest[labels]


def exact_neighbour_block(
    task: tuple[np.ndarray, np.ndarray, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of rows [start, start + block) by Euclidean distance, nearest
    first, ties by row (a task for a process)."""
    vectors, squared_norms, start, k = task
    stop = start + block_rows(len(vectors))
    block = vectors[start:stop].astype(np.float64)
    squared = (
        squared_norms[start:stop, None]
        + squared_norms[None, :]
        - 2.0 * block @ vectors.T.astype(np.float64)
    )
    np.maximum(squared, 0.0, out=squared)
    rows = np.arange(start, start + len(block))
    squared[np.arange(len(block)), rows] = np.inf  # never its own neighbour
    count = min(k, vectors.shape[0] - 1)
    candidates = np.argpartition(squared, count, axis=1)[:, : count + 1]
    # The chosen distances measured again directly: the expanded formula above leaves
    # rounding, and a copy of a vector must be at distance 0.
    differences = vectors[candidates].astype(np.float64) - block[:, None, :]
    near = np.sqrt((differences**2).sum(axis=2))
    near[candidates == rows[:, None]] = np.inf
    order = np.lexsort((candidates, near), axis=1)[:, :count]
    indices = np.take_along_axis(candidates, order, axis=1)
    distances = np.take_along_axis(near, order, axis=1)
    return indices.astype(np.int64), distances.astype(np.float32)


def nearest_neighbours(
    vectors: np.ndarray, k: int, exact_below: int, seed: int, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows (indices, Euclidean distances), nearest first.

    Exact (blocks of rows on `workers` processes) below `exact_below` rows; beyond, from
    pynndescent's approximate nearest-neighbour graph, seeded and on one thread so that the
    same vectors give the same neighbours.
    """
    count = len(vectors)
    if count < 2:
        return np.empty((count, 0), dtype=np.int64), np.empty((count, 0), dtype=np.float32)
    if count < exact_below:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        squared_norms = (vectors.astype(np.float64) ** 2).sum(axis=1)
        step = block_rows(count)
        tasks = [(vectors, squared_norms, start, k) for start in range(0, count, step)]
        parts = list(common.map_in_processes(exact_neighbour_block, tasks, workers))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    from pynndescent import NNDescent

    index = NNDescent(
        np.ascontiguousarray(vectors, dtype=np.float32),
        n_neighbors=min(k + 1, count),
        random_state=seed,
        n_jobs=1,
        low_memory=True,
    )
    indices, distances = index.neighbor_graph
    return drop_self(indices, distances, k)


def drop_self(indices: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour lists without each row itself, k long, nearest first, ties by row (-1 and
    infinity fill a list that lacks neighbours)."""
    itself = indices == np.arange(len(indices))[:, None]
    near = np.where(itself | (indices < 0), np.inf, distances).astype(np.float32)
    order = np.lexsort((indices, near), axis=1)[:, :k]
    kept_indices = np.take_along_axis(indices, order, axis=1).astype(np.int64)
    kept_distances = np.take_along_axis(near, order, axis=1)
    kept_indices[np.isinf(kept_distances)] = -1
    return kept_indices, kept_distances
