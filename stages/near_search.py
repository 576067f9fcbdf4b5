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


# The arrays of the search in progress: forked processes inherit them instead of
# receiving them with every task.
_HASH_SEARCH: dict[str, np.ndarray] = {}
EMPTY_PAIRS = (
    np.empty(0, dtype=np.int64),
    np.empty(0, dtype=np.int64),
    np.empty(0, dtype=np.uint8),
    np.empty(0, dtype=bool),
)


def hash_pair_block(
    task: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs within `limit` bits between the searched rows [start, stop) of the search
    that hash_pairs set up and every usable row (a task for a process).

    Each pair is measured once: a searched row meets every row that is not searched and
    the searched rows after it. Returns rows a < b, distances, and whether a mirrored hash
    was the nearer.
    """
    start, stop, limit = task
    hashes, mirrors = _HASH_SEARCH["hashes"], _HASH_SEARCH["mirrors"]
    is_searched = _HASH_SEARCH["is_searched"]
    block = _HASH_SEARCH["searched_rows"][start:stop]
    everyone = np.arange(len(hashes))
    others = np.flatnonzero(_HASH_SEARCH["usable"] & (~is_searched | (everyone > block[0])))
    if not len(others):
        return EMPTY_PAIRS
    plain = np.bitwise_count(hashes[block, None] ^ hashes[None, others])
    # Either image mirrored, so that a pair's distance does not depend on its order.
    mirrored = np.minimum(
        np.bitwise_count(mirrors[block, None] ^ hashes[None, others]),
        np.bitwise_count(hashes[block, None] ^ mirrors[None, others]),
    )
    nearest = np.minimum(plain, mirrored)
    measured_from_other = is_searched[others][None, :] & (others[None, :] <= block[:, None])
    rows, columns = np.nonzero((nearest <= limit) & ~measured_from_other)
    first, second = block[rows], others[columns]
    return (
        np.minimum(first, second).astype(np.int64),
        np.maximum(first, second).astype(np.int64),
        nearest[rows, columns].astype(np.uint8),
        mirrored[rows, columns] < plain[rows, columns],
    )


def hash_pairs(
    hashes: np.ndarray,
    mirrors: np.ndarray,
    usable: np.ndarray,
    limit: int,
    workers: int,
    searched: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of usable rows (a < b) whose hashes are within `limit` bits, either as
    they are or with one mirrored, and of which at least one row is `searched` (a mask;
    every row when None): rows a, rows b, distance, mirrored, ordered by (a, b).

    Exact, in blocks of searched rows on `workers` processes. A search of only the new
    rows, joined with the last search's pairs among the others, gives the pairs of a
    search of every row.
    """
    is_searched = np.ones(len(hashes), dtype=bool) if searched is None else searched.astype(bool)
    searched_rows = np.flatnonzero(is_searched & usable)
    step = block_rows(len(hashes))
    tasks = [
        (start, min(start + step, len(searched_rows)), limit)
        for start in range(0, len(searched_rows), step)
    ]
    _HASH_SEARCH.update(
        hashes=hashes,
        mirrors=mirrors,
        usable=usable.astype(bool),
        is_searched=is_searched,
        searched_rows=searched_rows,
    )
    try:
        parts = list(common.map_in_processes(hash_pair_block, tasks, workers))
    finally:
        _HASH_SEARCH.clear()
    if not parts:
        return EMPTY_PAIRS
    first, second, distance, mirrored = (
        np.concatenate([part[index] for part in parts]) for index in range(4)
    )
    order = np.lexsort((second, first))
    return first[order], second[order], distance[order], mirrored[order]


def groups_of_pairs(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The group of each of `count` rows: the connected components of the pairs, numbered
    by their smallest row (a row in no pair is alone in its own group)."""
    graph = coo_matrix((np.ones(len(first), dtype=np.int8), (first, second)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1 if count else 0, count, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(count))
    return smallest[labels]


# The vectors of the neighbour search in progress, inherited by forked processes.
_VECTOR_SEARCH: dict[str, np.ndarray] = {}


def exact_neighbour_block(task: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of the query rows [start, stop) of the search that
    exact_neighbours set up, by Euclidean distance, nearest first, ties by row (a task for
    a process)."""
    start, stop, k = task
    vectors, squared_norms = _VECTOR_SEARCH["vectors"], _VECTOR_SEARCH["squared_norms"]
    rows = _VECTOR_SEARCH["query_rows"][start:stop]
    block = vectors[rows].astype(np.float64)
    squared = (
        squared_norms[rows, None]
        + squared_norms[None, :]
        - 2.0 * block @ vectors.T.astype(np.float64)
    )
    squared[np.arange(len(rows)), rows] = np.inf  # never its own neighbour
    count = min(k, vectors.shape[0] - 1)
    candidates = np.argpartition(squared, count, axis=1)[:, : count + 1]
    near = measured_distances(vectors, rows[:, None], candidates)
    near[candidates == rows[:, None]] = np.inf
    order = np.lexsort((candidates, near), axis=1)[:, :count]
    indices = np.take_along_axis(candidates, order, axis=1)
    distances = np.take_along_axis(near, order, axis=1)
    return indices.astype(np.int64), distances.astype(np.float32)


def measured_distances(vectors: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Distances between rows `first` and `second` (broadcast), measured directly in float64.

    The expanded formula that chooses candidates leaves rounding; measured again, a copy of
    a vector is at distance 0 and the same pair gives the same bits whichever search asks.
    """
    differences = vectors[second].astype(np.float64) - vectors[first].astype(np.float64)
    return np.sqrt((differences**2).sum(axis=-1))


def exact_neighbours(
    vectors: np.ndarray, k: int, workers: int, query_rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of each query row (every row when None): indices and
    distances, nearest first, ties by row. Exact, in blocks of rows on `workers` processes."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.arange(len(vectors)) if query_rows is None else np.asarray(query_rows, np.int64)
    count = min(k, len(vectors) - 1)
    if not len(rows) or count < 1:
        return np.empty((len(rows), 0), dtype=np.int64), np.empty((len(rows), 0), np.float32)
    step = block_rows(len(vectors))
    tasks = [(start, min(start + step, len(rows)), k) for start in range(0, len(rows), step)]
    _VECTOR_SEARCH.update(
        vectors=vectors,
        squared_norms=(vectors.astype(np.float64) ** 2).sum(axis=1),
        query_rows=rows,
    )
    try:
        parts = list(common.map_in_processes(exact_neighbour_block, tasks, workers))
    finally:
        _VECTOR_SEARCH.clear()
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


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
        return exact_neighbours(vectors, k, workers)
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


def updated_neighbours(
    vectors: np.ndarray,
    indices: np.ndarray,
    distances: np.ndarray,
    new: np.ndarray,
    workers: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The neighbour lists of every row once the rows marked `new` have joined, and how
    many rows were searched: the new
    rows (and rows whose list names a row that is new, -1 or out of range) are searched
    exactly against every row; every other row keeps its list, with any new row that comes
    nearer merged in (ties by row).

    `indices` and `distances` hold the earlier lists in the current rows (anything for a
    new row). Where the earlier lists were exact, the result equals an exact search of
    every row; where they were approximate, every pair with a new row is exact.
    """
    k = indices.shape[1]
    count = len(vectors)
    new = np.asarray(new, dtype=bool)
    broken = (indices < 0) | (indices >= count)
    names_new = new[np.clip(indices, 0, max(count - 1, 0))]
    stale = new | (broken | names_new).any(axis=1)
    if k == 0 or not stale.any():
        return indices, distances, 0
    indices, distances = indices.copy(), distances.copy()
    searched = np.flatnonzero(stale)
    found = padded(*exact_neighbours(vectors, k, workers, searched), k)
    indices[searched], distances[searched] = found
    kept = np.flatnonzero(~stale)
    if len(kept) and new.any():
        merge_new_rows(vectors, indices, distances, kept, np.flatnonzero(new))
    return indices, distances, len(searched)


def padded(indices: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists k long: -1 and infinity fill the lists of a collection of k images or fewer."""
    missing = k - indices.shape[1]
    if missing <= 0:
        return indices, distances
    return (
        np.pad(indices, ((0, 0), (0, missing)), constant_values=-1),
        np.pad(distances, ((0, 0), (0, missing)), constant_values=np.inf),
    )


def merge_new_rows(
    vectors: np.ndarray,
    indices: np.ndarray,
    distances: np.ndarray,
    kept: np.ndarray,
    new_rows: np.ndarray,
) -> None:
    """Merge into the lists of the `kept` rows (in place) every new row that comes nearer
    than their k-th neighbour, in blocks of new rows."""
    k = indices.shape[1]
    vectors32 = np.ascontiguousarray(vectors, dtype=np.float32)
    kept_vectors = vectors32[kept].astype(np.float64)
    kept_norms = (kept_vectors**2).sum(axis=1)
    # the k-th distance with a margin for the expanded formula's rounding
    reach = distances[kept, k - 1].astype(np.float64)
    reach = (reach * (1 + 1e-5) + 1e-6) ** 2
    pair_kept, pair_new = [], []
    for start in range(0, len(new_rows), block_rows(len(kept))):
        block = new_rows[start : start + block_rows(len(kept))]
        block_vectors = vectors32[block].astype(np.float64)
        squared = (
            (block_vectors**2).sum(axis=1)[:, None]
            + kept_norms[None, :]
            - 2.0 * block_vectors @ kept_vectors.T
        )
        near_new, near_kept = np.nonzero(squared <= reach[None, :])
        pair_kept.append(kept[near_kept])
        pair_new.append(block[near_new])
    rows = np.concatenate(pair_kept) if pair_kept else np.empty(0, np.int64)
    if not len(rows):
        return
    others = np.concatenate(pair_new)
    near = measured_distances(vectors32, rows, others).astype(np.float32)
    touched = np.unique(rows)
    # each touched row's list and its new candidates, sorted by (row, distance, index)
    all_rows = np.concatenate([np.repeat(touched, k), rows])
    all_others = np.concatenate([indices[touched].ravel(), others])
    all_near = np.concatenate([distances[touched].ravel(), near])
    order = np.lexsort((all_others, all_near, all_rows))
    all_rows, all_others, all_near = all_rows[order], all_others[order], all_near[order]
    first = np.searchsorted(all_rows, touched)
    take = (first[:, None] + np.arange(k)[None, :]).ravel()
    indices[touched] = all_others[take].reshape(-1, k)
    distances[touched] = all_near[take].reshape(-1, k)


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
