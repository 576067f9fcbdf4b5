"""The min-hashes of the patterns stage, compiled by numba: every hash of every word's
inverted file in one pass over its elements, words split across the cores. numpy needed
one pass over all the elements for each hash (1,000 of them by default): 115 s at
100,000 images of 300 keypoints, which this kernel cuts to a few seconds.

Compiled once per machine (numba's cache beside this file), on the first mining.
"""

from __future__ import annotations

import numba
import numpy as np

GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


def seed_offsets(seeds: np.ndarray) -> np.ndarray:
    """What splitmix64 adds to a value for each seed (seed x GOLDEN, modulo 2**64)."""
    return np.array([(int(seed) * GOLDEN) & 0xFFFFFFFFFFFFFFFF for seed in seeds], np.uint64)


@numba.njit(cache=True, nogil=True, parallel=True)
def min_hashes(elements: np.ndarray, starts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Words x hashes: for each word (its elements are elements[starts[w]:starts[w + 1]])
    and each offset, the least splitmix64 of its elements (see patterns.splitmix64)."""
    words = len(starts) - 1
    result = np.empty((words, len(offsets)), np.uint64)
    for word in numba.prange(words):
        for hash_number in range(len(offsets)):
            least = np.uint64(0xFFFFFFFFFFFFFFFF)
            for position in range(starts[word], starts[word + 1]):
                z = elements[position] + offsets[hash_number]
                z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                z = z ^ (z >> np.uint64(31))
                if z < least:
                    least = z
            result[word, hash_number] = least
    return result
