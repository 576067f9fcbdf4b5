"""mine: sets of visual words that keep occurring together, mined with Sampled
MinHashing (Fuentes-Pineda and Meza-Ruiz), as minIA does: the patterns the patterns
stage then finds in every image (fitted once, like the vocabulary and the clusters:
`dvc freeze mine` keeps them while new images arrive).

Params:  PatternsParams in stages/pattern_model.py (params.yaml, section patterns)
Inputs:  data/processed/words/ (id, word, x, y, size), data/raw/manifest.parquet (the
         images, of which at most `sample` are mined: a seeded sample by file content)
Outputs: models/patterns.parquet (pattern, words, weights, word_count, support: the
         patterns ranked by how many images held them when mined), metrics/mine.json

Every visual word is its inverted file: the images it occurs in, each repeated as many
times as its weight there (`frequency`: how many of the image's keypoints are that word;
`size`: their summed size, in steps of SIZE_STEP of the long side). In each of `tables`
tables, `tuple_size` min-hashes of every word's inverted file make a tuple; words with
equal tuples share a bucket, which two words whose inverted files have weighted Jaccard
similarity J do with probability J^tuple_size in one table. Buckets of two words or more
are sets of co-occurring words. An image holds a set of words when it has at least
min_share of them, and two at least. Sets whose words co-occur less than min_lift
times more often than independent words would are dropped (common words meet by
chance), as are sets held by fewer than min_support images; sets held by nearly the
same images (at least merge_similarity of the fewer images shared with a group's first,
most held set) form one pattern: the pieces of one recurring structure. A word weighs
in a pattern as many of its sets hold it, so the structure's core words count most; an
image holds a pattern when it has at least min_share of that weight, and two of its
words (stages/pattern_model.py), and a pattern is kept when min_support images hold it.
Words in more than max_word_share of the images are left out first: a word everywhere
co-occurs with everything and means no structure.

The min-hashes are splitmix64 of each element with a seed per hash, computed by a numba
kernel (stages/minhash_kernel.py) in one pass over each word's elements: datasketch
hashes one set at a time in Python and knows no integer weights. An element names its
image by a hash of its id, not its row, and the min-hashes are kept in data/cache/mine/
(by the words' key and the hashing params): a run with new images hashes only their
elements (and words it had left out), since a minimum over more elements is the least of
the old one and the new ones'. The patterns are the same as mining everything afresh.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from stages import common, minhash_kernel, pattern_model, settings
from stages.pattern_model import MAX_WEIGHT, SIZE_STEP, PatternsParams

STAGE = "mine"
CACHE_DIR = common.CACHE_DIR / "mine"  # the min-hashes kept for the next run
MINE_METRICS_FILE = common.METRICS_DIR / "mine.json"


# ----------------------------------------------------------------------------- inverted files


def image_keys(ids: list[str]) -> np.ndarray:
    """A 56-bit key of each image id (its blake2b): an element names its image by this,
    not by its row, so the min-hashes do not depend on which images came first."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=7).digest(), "big") for i in ids],
        np.uint64,
    )


def elements(
    weights: pd.DataFrame, keys: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every word's weighted inverted file, flattened: (word, element) pairs sorted by
    word, an element being the image's key (`keys` by row; the row itself without) times
    (MAX_WEIGHT + 1) plus the copy number."""
    repeat = weights["weight"].to_numpy()
    word = np.repeat(weights["word"].to_numpy(np.int64), repeat)
    rows = weights["row"].to_numpy(np.int64)
    image = np.repeat(rows.astype(np.uint64) if keys is None else keys[rows], repeat)
    starts = np.repeat(np.cumsum(repeat) - repeat, repeat)
    copy = (np.arange(len(word)) - starts).astype(np.uint64)
    order = np.argsort(word, kind="stable")
    return word[order], (image * np.uint64(MAX_WEIGHT + 1) + copy)[order]


def splitmix64(values: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit mix of each value with a seed: a fresh pseudo-random order per seed."""
    with np.errstate(over="ignore"):
        z = values + minhash_kernel.seed_offsets(np.array([seed]))[0]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_offsets(params: PatternsParams) -> np.ndarray:
    """What splitmix64 adds for each of the tables x tuple_size min-hashes."""
    seeds = [
        params.seed * 1_000_003 + table * 64 + position
        for table in range(params.tables)
        for position in range(params.tuple_size)
    ]
    return minhash_kernel.seed_offsets(np.array(seeds))


def word_minimums(
    word: np.ndarray, element: np.ndarray, params: PatternsParams
) -> tuple[np.ndarray, np.ndarray]:
    """The words present (sorted) and each one's min-hashes (words x hashes) over its
    elements."""
    words_present, starts = np.unique(word, return_index=True)
    bounds = np.append(starts, len(element)).astype(np.int64)
    return words_present, minhash_kernel.min_hashes(element, bounds, hash_offsets(params))


def word_buckets(
    words_present: np.ndarray, minimums: np.ndarray, tuple_size: int, tables: int
) -> list[frozenset[int]]:
    """The sets of words that share a bucket in some table (two words or more), each
    once, in the order found, from each word's min-hashes."""
    found: dict[frozenset[int], None] = {}
    for table in range(tables):
        key = np.zeros(len(words_present), np.uint64)
        for position in range(tuple_size):
            key = splitmix64(key ^ minimums[:, table * tuple_size + position], position + 1)
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        shared = counts[inverse] >= 2
        for bucket in np.unique(inverse[shared]):
            members = words_present[inverse == bucket]
            found.setdefault(frozenset(members.tolist()), None)
    return list(found)


# ----------------------------------------------------------------------------- kept min-hashes


@dataclass
class MinHashState:
    """The min-hashes a run found, which the next run updates with its new images alone:
    a minimum over more elements is the least of the old minimum and the new elements'."""

    images: dict[str, str]  # id -> sha256 of every image they were taken over
    words: np.ndarray  # int64, sorted: the words whose min-hashes are kept
    minimums: np.ndarray  # uint64, words x hashes

    def save(self, path: Path) -> None:
        """Write the state as .npz, atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with common.atomic_output(path) as temporary, open(temporary, "wb") as file:
            np.savez(
                file,
                ids=np.array(list(self.images), dtype=str),
                sha256s=np.array(list(self.images.values()), dtype=str),
                words=self.words,
                minimums=self.minimums,
            )

    @classmethod
    def load(cls, path: Path) -> MinHashState | None:
        """The state saved at `path`; None when there is none or it cannot be read."""
        try:
            with np.load(path) as stored:
                images = dict(zip(stored["ids"].tolist(), stored["sha256s"].tolist()))
                return cls(images, stored["words"], stored["minimums"])
        except (OSError, ValueError, KeyError):  # none yet, or damaged: mine from scratch
            return None


def state_path(words_key: str, params: PatternsParams) -> Path:
    """Where the min-hashes of these words and hashing params are kept."""
    made_with = {
        "words": words_key,
        "weighting": params.weighting,
        "hashes": hash_offsets(params).tolist(),
        "max_weight": MAX_WEIGHT,
        "size_step": SIZE_STEP,
    }
    key = hashlib.sha256(json.dumps(made_with, sort_keys=True).encode()).hexdigest()[:16]
    return CACHE_DIR / f"{key}.npz"


def current_minimums(
    kept: pd.DataFrame,
    keys: np.ndarray,
    images: dict[str, str],
    params: PatternsParams,
    previous: MinHashState | None,
) -> tuple[MinHashState, int]:
    """The min-hashes of the kept words over every image, and how many images were hashed.

    `kept` holds (row, word, weight) of the kept words; `images` maps every id, by row
    order, to its sha256. With a `previous` state over images all still here unchanged,
    its words are updated with the new images' elements only, and only words it lacks are
    hashed over every image; otherwise everything is hashed again. Either way the result
    is the same: a minimum does not depend on the order its elements came in.
    """
    ids = list(images)
    hashes = params.tables * params.tuple_size
    if previous is not None and (
        previous.minimums.shape[1] != hashes
        or any(images.get(i) != sha for i, sha in previous.images.items())
    ):
        previous = None  # an image gone or changed: its elements cannot be taken out
    known = set(previous.images) if previous is not None else set()
    old_row = np.array([image in known for image in ids], bool)
    words_present = np.unique(kept["word"].to_numpy(np.int64))
    held_words = previous.words if previous is not None else np.zeros(0, np.int64)
    covered = np.isin(words_present, held_words)
    minimums = np.full((len(words_present), hashes), np.iinfo(np.uint64).max, np.uint64)
    if previous is not None and covered.any():
        minimums[covered] = previous.minimums[np.searchsorted(held_words, words_present[covered])]
    kept_words = kept["word"].to_numpy(np.int64)
    fresh = kept[~np.isin(kept_words, words_present[covered]) | ~old_row[kept["row"].to_numpy()]]
    if len(fresh):
        found_words, found = word_minimums(*elements(fresh, keys), params)
        at = np.searchsorted(words_present, found_words)
        minimums[at] = np.minimum(minimums[at], found)
    return MinHashState(dict(images), words_present, minimums), int((~old_row).sum())


# ----------------------------------------------------------------------------- patterns


def word_indicator(word_sets: list[list[int]], vocabulary: int) -> sparse.csr_matrix:
    """Words x sets: 1 where a set holds a word."""
    columns = np.concatenate([np.array(w, np.int64) for w in word_sets])
    rows = np.repeat(np.arange(len(word_sets)), [len(w) for w in word_sets])
    return sparse.csr_matrix(
        (np.ones(len(columns)), (columns, rows)), shape=(vocabulary, len(word_sets))
    )


def holders(
    presence: sparse.csr_matrix, word_sets: list[list[int]], min_share: float
) -> sparse.csr_matrix:
    """Images x sets, boolean: whether each image holds each set of words (at least
    `min_share` of them, and two at least) and, as data, the share it holds."""
    counts = (presence @ word_indicator(word_sets, presence.shape[1])).tocoo()
    sizes = np.array([len(w) for w in word_sets], np.float64)
    needed = np.maximum(2, np.ceil(min_share * sizes - 1e-9))
    keep = counts.data >= needed[counts.col]
    shares = counts.data[keep] / sizes[counts.col[keep]]
    return sparse.csr_matrix((shares, (counts.row[keep], counts.col[keep])), shape=counts.shape)


def set_lifts(presence: sparse.csr_matrix, word_sets: list[list[int]]) -> np.ndarray:
    """Each set's mean lift over its pairs of words: how many times more images hold
    both words than if the words were independent (1: chance)."""
    if not word_sets:
        return np.zeros(0)
    used = np.unique(np.concatenate([np.array(w, np.int64) for w in word_sets]))
    columns = (presence[:, used] > 0).astype(np.float64).tocsc()
    both = (columns.T @ columns).toarray()
    alone = np.diag(both)
    place = {word: index for index, word in enumerate(used.tolist())}
    images = presence.shape[0]
    lifts = np.empty(len(word_sets))
    for number, members in enumerate(word_sets):
        at = np.array([place[w] for w in members])
        first, second = np.triu_indices(len(at), k=1)
        a, b = at[first], at[second]
        lifts[number] = float(np.mean(both[a, b] * images / (alone[a] * alone[b])))
    return lifts


def grouped_sets(held: sparse.csc_matrix, similarity: float) -> list[list[int]]:
    """Sets (columns of `held`, images x sets, 1 where an image holds a set) grouped by
    the images that hold them: from the most held, each set joins the first group whose
    first set shares at least `similarity` of the fewer of their two sets of images, or
    starts a group. Comparing with a group's first set only keeps groups from chaining
    through loosely related sets."""
    support = np.asarray(held.sum(axis=0)).ravel()
    shared = (held.T @ held).tocsr()
    order = np.lexsort((np.arange(len(support)), -support))
    seeds = np.zeros(len(support), np.int64)  # each group's first set, groups in order
    groups: list[list[int]] = []
    for index in order.tolist():
        # Compared with every group's seed at once: the first that shares enough.
        row = shared.getrow(index)
        overlap = np.zeros(len(support))
        overlap[row.indices] = row.data
        first = seeds[: len(groups)]
        both = overlap[first]
        fewer = np.minimum(support[first], support[index])
        joins = np.flatnonzero((both > 0) & (both / fewer >= similarity - 1e-9))
        if len(joins):
            groups[joins[0]].append(index)
        else:
            seeds[len(groups)] = index
            groups.append([index])
    return groups


def pattern_weights(
    group: list[int], member_sets: list[list[int]]
) -> tuple[list[int], list[float]]:
    """A group's words (sorted) and each one's weight in its pattern: how many of the
    group's sets hold the word, as a share of their sum, so the structure's core words
    count most."""
    words, counts = np.unique(
        np.concatenate([np.array(member_sets[i], np.int64) for i in group]), return_counts=True
    )
    return words.tolist(), (counts / counts.sum()).tolist()


class Mined(NamedTuple):
    """What mining gives: the patterns (the model: pattern, words, weights, word_count,
    support; by support), each image's patterns (id, pattern, score), how many word sets
    the tables gave, the min-hashes to keep for the next run and how many images were
    hashed."""

    patterns: pd.DataFrame
    image_patterns: pd.DataFrame
    sets: int
    state: MinHashState
    hashed: int


def mine_patterns(
    table: pd.DataFrame,
    ids: list[str],
    params: PatternsParams,
    sha256s: list[str] | None = None,
    previous: MinHashState | None = None,
) -> Mined:
    """Mine the patterns of a words table whose images are `ids` (their files' `sha256s`,
    the ids themselves when not given), updating `previous` min-hashes where they hold."""
    images = dict(zip(ids, sha256s if sha256s is not None else ids, strict=True))
    row = pattern_model.image_rows(table["id"], ids)
    table = table[row >= 0].assign(row=row[row >= 0])
    weights = pattern_model.image_word_weights(table, params.weighting)
    vocabulary = int(table["word"].max()) + 1 if len(table) else 1
    # Each (row, word) is once in weights: a word's count of rows is its images.
    images_of_word = np.bincount(weights["word"].to_numpy(), minlength=vocabulary)
    kept_word = (images_of_word <= params.max_word_share * len(ids)) & (
        images_of_word >= params.min_support
    )
    kept = weights[kept_word[weights["word"].to_numpy()]]
    empty_patterns = pd.DataFrame(
        {"pattern": [], "words": [], "weights": [], "word_count": [], "support": []}
    ).astype({"pattern": np.int32, "word_count": np.int32, "support": np.int32})
    empty_images = pattern_model.image_patterns_table([], np.zeros(0, int), [], [])
    state, hashed = current_minimums(kept, image_keys(ids), images, params, previous)
    if kept.empty:
        return Mined(empty_patterns, empty_images, 0, state, hashed)
    sets = word_buckets(state.words, state.minimums, params.tuple_size, params.tables)
    presence = pattern_model.presence_matrix(kept, len(ids), vocabulary)
    word_sets = [sorted(found) for found in sets]
    word_sets = [
        w
        for w, lift in zip(word_sets, set_lifts(presence, word_sets), strict=True)
        if lift >= params.min_lift
    ]
    if not word_sets:
        return Mined(empty_patterns, empty_images, len(sets), state, hashed)
    held = holders(presence, word_sets, params.min_share)
    supported = np.flatnonzero(np.asarray((held > 0).sum(axis=0)).ravel() >= params.min_support)
    if len(supported) == 0:
        return Mined(empty_patterns, empty_images, len(sets), state, hashed)
    sets_held = (held[:, supported] > 0).astype(np.float64).tocsc()
    groups = grouped_sets(sets_held, params.merge_similarity)
    member_sets = [word_sets[i] for i in supported]
    candidates = [pattern_weights(group, member_sets) for group in groups]
    words_of = [np.array(words, np.int64) for words, _ in candidates]
    found = pattern_model.pattern_holders(
        presence, words_of, [np.array(w) for _, w in candidates], params.min_share
    )
    support = np.bincount(found["column"].to_numpy(), minlength=len(candidates))
    chosen = np.flatnonzero(support >= params.min_support).tolist()
    # By support, then more words first, then the first found: a stable ranking.
    ranking = sorted(chosen, key=lambda c: (-support[c], -len(words_of[c]), c))
    number = np.zeros(len(candidates), np.int32)
    number[ranking] = np.arange(1, len(ranking) + 1)
    patterns = pd.DataFrame(
        {
            "pattern": np.arange(1, len(ranking) + 1, dtype=np.int32),
            "words": [candidates[c][0] for c in ranking],
            "weights": [candidates[c][1] for c in ranking],
            "word_count": np.array([len(words_of[c]) for c in ranking], np.int32),
            "support": np.array([support[c] for c in ranking], np.int32),
        }
    )
    found = found[number[found["column"].to_numpy()] > 0]
    image_patterns = pattern_model.image_patterns_table(
        ids, found["row"].to_numpy(), number[found["column"].to_numpy()], found["score"].to_numpy()
    )
    return Mined(patterns, image_patterns, len(sets), state, hashed)


def mining_images(images: pd.DataFrame, sample: int, seed: int) -> pd.DataFrame:
    """The images (id, sha256) the patterns are mined on: all of them up to `sample`, else
    a seeded sample by file content (common.page_sample), which a growing collection
    keeps, so the kept min-hashes stay valid from one run to the next."""
    rows = common.page_sample(images["sha256"].tolist(), sample, seed)
    return images.iloc[rows].reset_index(drop=True)


def mine_metrics(mined: Mined, images: int, collection: int) -> dict:
    """Counts for metrics/mine.json."""
    return {
        "images": images,
        "collection_images": collection,
        "word_sets": mined.sets,
        "patterns": len(mined.patterns),
    }


def main() -> None:
    """Read the words; write the mined patterns, their metrics and the kept min-hashes."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = PatternsParams.from_params(settings.load_params())
    words_key = common.parquet_keys(common.WORDS_DIR, made_by="words").get("words_key", "")
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    collection = common.distinct_images(manifest)
    images = mining_images(collection, params.sample, params.seed)
    ids = images["id"].tolist()
    table = common.read_words_table(ids=None if len(images) == len(collection) else ids)
    kept_at = state_path(words_key, params)
    mined = mine_patterns(table, ids, params, images["sha256"].tolist(), MinHashState.load(kept_at))
    mined.state.save(kept_at)
    pattern_model.write_model(mined.patterns, words_key)
    common.write_json(mine_metrics(mined, len(ids), len(collection)), MINE_METRICS_FILE)
    logger.info(
        "%d of %d images (%s): %d word sets, %d patterns (the most held by %d images); %.1f s",
        len(ids),
        len(collection),
        common.searched_words(mined.hashed, len(ids), "min-hashed"),
        mined.sets,
        len(mined.patterns),
        int(mined.patterns["support"].max()) if len(mined.patterns) else 0,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
