"""The inner loop of the perceptual-hash search (near_search.hash_pairs), compiled by numba:
about 2 ns a pair of images on one core, seven times numpy's pass of whole arrays, so that
the exact search of every pair stays feasible at a million images.

Compiled once per machine (numba's cache beside this file), on the first search.
"""

from __future__ import annotations

import numba
import numpy as np

# (row a, row b, distance, mirrored) of each pair found; the search grows them on need.
PairBuffers = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@numba.njit(cache=True, nogil=True, inline="always")
def bit_count(value: np.uint64) -> np.uint64:
    """The set bits of a 64-bit word (LLVM turns this into the popcnt instruction)."""
    value = value - ((value >> np.uint64(1)) & np.uint64(0x5555555555555555))
    value = (value & np.uint64(0x3333333333333333)) + (
        (value >> np.uint64(2)) & np.uint64(0x3333333333333333)
    )
    value = (value + (value >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (value * np.uint64(0x0101010101010101)) >> np.uint64(56)


@numba.njit(cache=True, nogil=True)
def block_pairs(
    hashes: np.ndarray,
    mirrors: np.ndarray,
    usable: np.ndarray,
    is_searched: np.ndarray,
    rows: np.ndarray,
    limit: int,
    first: np.ndarray,
    second: np.ndarray,
    distance: np.ndarray,
    mirrored: np.ndarray,
) -> int:
    """The pairs within `limit` bits between each of `rows` (searched, usable) and every
    usable row, each pair once: a searched row meets every row that is not searched and
    the searched rows after it. Writes as many as the buffers hold and returns how many
    there are (more than the buffers hold: call again with larger ones)."""
    found = 0
    count = hashes.shape[0]
    capacity = first.shape[0]
    for row in rows:
        plain_hash = hashes[row]
        mirror_hash = mirrors[row]
        for other in range(count):
            if not usable[other] or (is_searched[other] and other <= row):
                continue
            plain = bit_count(plain_hash ^ hashes[other])
            # either image mirrored, so that a pair's distance does not depend on its order
            flipped = min(
                bit_count(mirror_hash ^ hashes[other]), bit_count(plain_hash ^ mirrors[other])
            )
            nearest = min(plain, flipped)
            if nearest <= limit:
                if found < capacity:
                    first[found] = min(row, other)
                    second[found] = max(row, other)
                    distance[found] = nearest
                    mirrored[found] = flipped < plain
                found += 1
    return found


def empty_buffers(capacity: int) -> PairBuffers:
    """Buffers for `capacity` pairs."""
    return (
        np.empty(capacity, dtype=np.int64),
        np.empty(capacity, dtype=np.int64),
        np.empty(capacity, dtype=np.uint8),
        np.empty(capacity, dtype=np.bool_),
    )


def pairs_of_rows(
    hashes: np.ndarray,
    mirrors: np.ndarray,
    usable: np.ndarray,
    is_searched: np.ndarray,
    rows: np.ndarray,
    limit: int,
) -> PairBuffers:
    """The pairs block_pairs finds for `rows`, in arrays of their own length."""
    buffers = empty_buffers(4096)
    found = block_pairs(hashes, mirrors, usable, is_searched, rows, limit, *buffers)
    if found > len(buffers[0]):
        buffers = empty_buffers(found)
        block_pairs(hashes, mirrors, usable, is_searched, rows, limit, *buffers)
    return tuple(buffer[:found] for buffer in buffers)  # type: ignore[return-value]
