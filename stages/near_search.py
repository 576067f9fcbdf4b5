"""Searches for near images, shared by the duplicates, split, health and similar steps:
perceptual-hash pairs within a Hamming distance, nearest neighbours in the latent space,
and the groups that pairs join.

Every search is exact up to `exact_below` images and deterministic: ties are broken by row.
Beyond it, nearest neighbours come from an approximate index (pynndescent, seeded), so that
a million images stay feasible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stages import common

BLOCK_CELLS = 2**22  # (row, other row) distances held at once by one process: 32 MiB
HASH_TASK_PAIRS = 2**28  # pairs of hashes one task of the hash search compares: ~0.5 s


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
    that hash_pairs set up and every usable row (a task for a process): rows a < b,
    distances, and whether a mirrored hash was the nearer."""
    from stages import hash_kernel  # numba: a second to import, paid by the search alone

    start, stop, limit = task
    search = _HASH_SEARCH
    rows = search["searched_rows"][start:stop]
    return hash_kernel.pairs_of_rows(
        search["hashes"], search["mirrors"], search["usable"], search["is_searched"], rows, limit
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

    Exact (stages/hash_kernel.py compares every pair), in tasks of searched rows on
    `workers` processes. A search of only the new rows, joined with the last search's
    pairs among the others, gives the pairs of a search of every row.
    """
    is_searched = np.ones(len(hashes), dtype=bool) if searched is None else searched.astype(bool)
    searched_rows = np.flatnonzero(is_searched & usable)
    # Tasks of about HASH_TASK_PAIRS pairs: the first rows of a whole search meet the most.
    tasks, start = [], 0
    while start < len(searched_rows):
        stop = start + 1
        pairs = len(hashes) - searched_rows[start]
        while stop < len(searched_rows) and pairs < HASH_TASK_PAIRS:
            pairs += len(hashes) - searched_rows[stop]
            stop += 1
        tasks.append((start, stop, limit))
        start = stop
    _HASH_SEARCH.update(
        hashes=np.ascontiguousarray(hashes, dtype=np.uint64),
        mirrors=np.ascontiguousarray(mirrors, dtype=np.uint64),
        usable=usable.astype(bool),
        is_searched=is_searched,
        searched_rows=searched_rows,
    )
    if tasks:
        from stages import hash_kernel  # compiled here, before the processes fork

        hash_kernel.pairs_of_rows(
            *(_HASH_SEARCH[key] for key in ("hashes", "mirrors", "usable", "is_searched")),
            searched_rows[:0],
            limit,
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
    by their smallest row (a row in no pair is alone in its own group).

    Each row's label starts as itself; every round, both rows of a pair take the lower of
    their labels, and each label then takes its own label's until none changes. Labels
    only fall and stay inside a component, so at the end each component holds its
    smallest row's. A few numpy calls a round, not scipy's graph module, which took a
    sixth of a second to import in each stage that groups.
    """
    first, second = np.asarray(first, np.int64), np.asarray(second, np.int64)
    labels = np.arange(count, dtype=np.int64)
    while True:
        before = labels.copy()
        lower = np.minimum(labels[first], labels[second])
        np.minimum.at(labels, first, lower)
        np.minimum.at(labels, second, lower)
        while not np.array_equal(jumped := labels[labels], labels):
            labels = jumped
        if np.array_equal(labels, before):
            return labels


# The vectors of the neighbour search in progress, inherited by forked processes.
_VECTOR_SEARCH: dict[str, np.ndarray] = {}
_SCRATCH: dict[str, np.ndarray] = {}  # see scratch()
MEASURED_CELLS = 2**22  # float64s of differences one search measures at once: 32 MiB


def estimate_error_share(dimensions: int) -> float:
    """How far a float64 estimate of |a - b|^2 from |a|^2 + |b|^2 - 2ab can be off, as a
    share of |a|^2 + |b|^2: the rounding bound of a dot product of this length, with room
    for the norms and sums."""
    return (dimensions + 8) * 2.0**-52


def scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 array of `shape` that this process keeps for the next block: a fresh
    block-sized array costs its page faults every block (32 MiB, about 0.07 s here), more
    than the products it holds."""
    size = math.prod(shape)
    held = _SCRATCH.get(name)
    if held is None or held.size < size:
        held = _SCRATCH[name] = np.empty(size, dtype=np.float64)
    return held[:size].reshape(shape)


def estimated_squared(
    block: np.ndarray,
    block_norms: np.ndarray,
    vectors: np.ndarray,
    norms: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Squared distances between rows of `block` and of `vectors`, estimated (into `out`)."""
    squared = np.matmul(block, vectors.T, out=out)
    squared *= -2.0
    squared += block_norms[:, None]
    squared += norms[None, :]
    return squared


def exact_neighbour_block(
    task: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The k nearest other rows of the query rows [start, stop) of the search that
    exact_neighbours set up, by Euclidean distance, nearest first, ties by row (a task for
    a process); and the pairs (query row, other row) within the other row's reach, when
    the search has reaches (see exact_neighbours): other rows, query rows, distances.

    Distances are estimated in float64 on vectors centred on their mean (float32 rounding
    could not tell apart thousands of near-identical night frames), and every pair whose
    estimate cannot rule it out is measured exactly.
    """
    start, stop, k = task
    search = _VECTOR_SEARCH
    vectors, centred, norms = search["vectors"], search["centred"], search["centred_norms"]
    rows = search["query_rows"][start:stop]
    shape = (len(rows), len(centred))
    estimate = estimated_squared(
        centred[rows], norms[rows], centred, norms, scratch("estimate", shape)
    )
    error_rows, error_columns = search["share"] * norms[rows], search["share"] * norms
    itself = (np.arange(len(rows)), rows)
    count = min(k, vectors.shape[0] - 1)
    # Bounds of the true squared distances: estimate -/+ (error_columns + error_rows). The
    # k-th smallest upper bound bounds the k-th neighbour's; every pair whose lower bound
    # is within it may be among the k nearest. The row's error is added after the
    # partition, and the comparisons take it on their right side: fewer passes over a
    # block of rows x every row.
    bound = np.add(estimate, error_columns[None, :], out=scratch("bound", shape))
    bound[itself] = np.inf
    bound.partition(count - 1, axis=1)  # in place: bound is written again below
    kth_upper = bound[:, count - 1] + error_rows
    lower_but_row = np.subtract(estimate, error_columns[None, :], out=bound)
    lower_but_row[itself] = np.inf
    within_row, within = np.nonzero(lower_but_row <= (kth_upper + error_rows)[:, None])
    candidates = candidate_table(rows, within_row, within)
    near = np.empty(candidates.shape, dtype=np.float64)
    step = max(1, MEASURED_CELLS // max(candidates.shape[1] * vectors.shape[1], 1))
    for first in range(0, len(rows), step):
        part = slice(first, first + step)
        near[part] = measured_distances(vectors, rows[part, None], candidates[part])
    near[candidates == rows[:, None]] = np.inf
    # Ordered by the distances as kept (float32), ties by row, as merge_pairs orders them.
    near = near.astype(np.float32)
    order = np.lexsort((candidates, near), axis=1)[:, :count]
    indices = np.take_along_axis(candidates, order, axis=1).astype(np.int64)
    distances = np.take_along_axis(near, order, axis=1)
    if "reach" not in search:
        return indices, distances, *EMPTY_PAIRS[:2], np.empty(0, np.float32)
    reached_query, reached = np.nonzero(
        lower_but_row <= search["reach"][None, :] + error_rows[:, None]
    )
    reached_query = rows[reached_query]
    measured = np.empty(len(reached), dtype=np.float32)
    step = max(1, MEASURED_CELLS // vectors.shape[1])
    for first in range(0, len(reached), step):
        part = slice(first, first + step)
        measured[part] = measured_distances(vectors, reached_query[part], reached[part])
    return indices, distances, reached, reached_query, measured


def candidate_table(rows: np.ndarray, within_row: np.ndarray, within: np.ndarray) -> np.ndarray:
    """The candidate rows of each query row (`within` for the query at position
    `within_row`, grouped by position as np.nonzero gives them) as a table as wide as
    the longest list, the query row itself filling the rest (its distance is discarded)."""
    counts = np.bincount(within_row, minlength=len(rows))
    table = np.repeat(rows[:, None], max(int(counts.max(initial=0)), 1), axis=1)
    starts = np.cumsum(counts) - counts
    table[within_row, np.arange(len(within)) - starts[within_row]] = within
    return table


def measured_distances(vectors: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Distances between rows `first` and `second` (broadcast), measured directly in float64:
    a copy of a vector is at distance 0, and a pair gives the same bits whichever search
    asks."""
    differences = vectors[second].astype(np.float64) - vectors[first].astype(np.float64)
    return np.sqrt((differences**2).sum(axis=-1))


def exact_neighbours(
    vectors: np.ndarray,
    k: int,
    workers: int,
    query_rows: np.ndarray | None = None,
    reach: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The k nearest other rows of each query row (every row when None): indices and
    distances, nearest first, ties by row. Exact, in blocks of rows on `workers` processes.

    With `reach` (a squared distance per row), also the pairs of a query row and a row
    that it may come within that reach of: (row, query row, distance), the candidates to
    merge into that row's list.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.arange(len(vectors)) if query_rows is None else np.asarray(query_rows, np.int64)
    count = min(k, len(vectors) - 1)
    no_pairs = (*EMPTY_PAIRS[:2], np.empty(0, np.float32))
    if not len(rows) or count < 1:
        empty = np.empty((len(rows), 0), dtype=np.int64)
        return empty, np.empty((len(rows), 0), np.float32), no_pairs
    step = block_rows(len(vectors))
    tasks = [(start, min(start + step, len(rows)), k) for start in range(0, len(rows), step)]
    # One float64 copy for the whole search (8 bytes a value): converting in every block
    # cost more than the products.
    centred = np.subtract(vectors, vectors.mean(axis=0, dtype=np.float64), dtype=np.float64)
    _VECTOR_SEARCH.update(
        vectors=vectors,
        centred=centred,
        # einsum: no second array as large as the vectors (its page faults cost more
        # than the sums)
        centred_norms=np.einsum("ij,ij->i", centred, centred),
        share=np.float64(estimate_error_share(vectors.shape[1])),
        query_rows=rows,
    )
    if reach is not None:
        _VECTOR_SEARCH["reach"] = reach
    try:
        parts = list(common.map_in_processes(exact_neighbour_block, tasks, workers))
    finally:
        _VECTOR_SEARCH.clear()
    indices, distances, *pairs = (np.concatenate([p[i] for p in parts]) for i in range(5))
    return indices, distances, tuple(pairs)  # type: ignore[return-value]


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
        return exact_neighbours(vectors, k, workers)[:2]
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
    # A kept row's reach: the square of its k-th distance. The search of the new rows finds
    # on the way the pairs that may come within it.
    reach = np.full(count, -np.inf, dtype=np.float64)
    kept = ~stale
    reach[kept] = distances[kept, k - 1].astype(np.float64) ** 2 * (1 + 1e-6)  # ties reach
    found_indices, found_distances, pairs = exact_neighbours(vectors, k, workers, searched, reach)
    indices[searched], distances[searched] = padded(found_indices, found_distances, k)
    rows, others, near = pairs
    from_new = new[others]  # a stale old row is in the kept lists already, or never was
    merge_pairs(indices, distances, rows[from_new], others[from_new], near[from_new])
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


def merge_pairs(
    indices: np.ndarray,
    distances: np.ndarray,
    rows: np.ndarray,
    others: np.ndarray,
    near: np.ndarray,
) -> None:
    """Merge each pair's other row into its row's list (in place): the k nearest of the list
    and its candidates, ties by row."""
    if not len(rows):
        return
    k = indices.shape[1]
    touched = np.unique(rows)
    all_rows = np.concatenate([np.repeat(touched, k), rows])
    all_others = np.concatenate([indices[touched].ravel(), others])
    all_near = np.concatenate([distances[touched].ravel(), near])
    order = np.lexsort((all_others, all_near, all_rows))
    all_rows, all_others, all_near = all_rows[order], all_others[order], all_near[order]
    first_of_row = np.searchsorted(all_rows, touched)
    take = (first_of_row[:, None] + np.arange(k)[None, :]).ravel()
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
