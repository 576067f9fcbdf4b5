"""duplicates: find the pairs of images whose perceptual hashes are near, before the split,
so that near-copies of one picture never sit on both sides of an evaluation.

Params:  DuplicatesParams below (params.yaml, section duplicates)
Inputs:  data/raw/manifest.parquet (phash, phash_mirror, blank)
Outputs: data/processed/hash_pairs.parquet (id_a, id_b, distance, mirrored; id_a < id_b
         in manifest order)

sync measures every image's pHash (64 bits from the lowest frequencies of a DCT) and the
pHash of its mirror image. Two images are a pair when their hashes differ in at most
phash_max_distance bits, as they are or with either one mirrored: this finds resized,
re-encoded, brightened, lightly cropped and mirrored copies. On the tests' photo-like
scenes, 8 bits group every such copy and no look-alike, 4 bits 81% of the pairs; the
default is 4 because the demo's 8x8 digits hash so coarsely that distinct digits come
within 8 (the README's presets for photos use 8). Blank frames (sync's flag)
are left out: every black frame hashes alike. The search is exact: every pair of hashes is
compared (stages/hash_kernel.py, compiled by numba, about 2 ns a pair on one core), on
every core. The health stage joins these pairs with nearness in the latent space.

A run searches only the images that are new or whose hashes changed since the last run
(data/cache/duplicates/ keeps what it searched and found) and keeps the pairs among the
others: the same pairs as a search of every image, at a cost in proportion to what is new.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from stages import common, near_search, settings

STAGE = "duplicates"
HASH_PAIRS_FILE = common.PROCESSED_DIR / "hash_pairs.parquet"
CACHE_DIR = common.CACHE_DIR / "duplicates"
SEARCHED_FILE = "searched.parquet"  # id and hashes of every image the last run covered
FOUND_FILE = "pairs.parquet"  # the pairs it wrote
# Bump when what makes a pair changes: a cache of another version is not used.
SEARCH_VERSION = "pairs-2"
HASH_COLUMNS = ["id", "phash", "phash_mirror", "blank"]


class DuplicatesParams(settings.Section):
    """params.yaml, section duplicates."""

    SECTION: ClassVar[str] = "duplicates"
    phash_max_distance: int = Field(
        4,
        ge=0,
        le=64,
        description="two images whose perceptual hashes differ in at most this many of 64 "
        "bits (either one mirrored) are near-duplicates; 8 for photos (see the README)",
    )


@dataclass(frozen=True)
class LastSearch:
    """What the last run searched (id and hashes of each image) and the pairs it found."""

    searched: pd.DataFrame  # HASH_COLUMNS
    pairs: pd.DataFrame  # id_a, id_b, distance, mirrored


def pair_frame(
    ids: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    distance: np.ndarray,
    mirrored: np.ndarray,
) -> pd.DataFrame:
    """The pairs of rows (first, second) as a table of ids."""
    return pd.DataFrame(
        {
            "id_a": pd.Series(ids[first], dtype="str"),
            "id_b": pd.Series(ids[second], dtype="str"),
            "distance": pd.Series(distance, dtype="int8"),
            "mirrored": pd.Series(mirrored, dtype="bool"),
        }
    )


def unchanged_rows(manifest: pd.DataFrame, last: LastSearch | None) -> np.ndarray:
    """Whether each manifest image was searched last time with the hashes it has now."""
    if last is None or last.searched.empty:
        return np.zeros(len(manifest), dtype=bool)
    now = manifest[HASH_COLUMNS].astype({"id": str, "phash": str, "phash_mirror": str})
    before = last.searched.astype({"id": str, "phash": str, "phash_mirror": str})
    joined = now.merge(before, on="id", how="left", suffixes=("", "_before"))
    return (
        (joined["phash"] == joined["phash_before"])
        & (joined["phash_mirror"] == joined["phash_mirror_before"])
        & (joined["blank"] == joined["blank_before"])
    ).to_numpy(dtype=bool)


def hash_pair_table(
    manifest: pd.DataFrame, limit: int, workers: int, last: LastSearch | None = None
) -> tuple[pd.DataFrame, int]:
    """The near pairs of the manifest's images (see the module docstring), in manifest
    order, and how many images were searched: those `last` did not cover as they are now.
    """
    manifest = manifest.reset_index(drop=True)
    ids = manifest["id"].astype(str).to_numpy()
    hashes = near_search.hash_values(manifest["phash"].tolist())
    mirrors = near_search.hash_values(manifest["phash_mirror"].tolist())
    usable = ~manifest["blank"].to_numpy(dtype=bool)
    known = unchanged_rows(manifest, last)
    found = near_search.hash_pairs(hashes, mirrors, usable, limit, workers, searched=~known)
    parts = [found]
    if last is not None and known.any():
        row_of = pd.Series(np.arange(len(ids)), index=ids)
        unchanged = ids[known]
        kept = last.pairs[
            common.is_among(last.pairs["id_a"], unchanged)
            & common.is_among(last.pairs["id_b"], unchanged)
        ]
        rows_a = row_of[kept["id_a"]].to_numpy(np.int64)
        rows_b = row_of[kept["id_b"]].to_numpy(np.int64)
        parts.append(
            (
                np.minimum(rows_a, rows_b),
                np.maximum(rows_a, rows_b),
                kept["distance"].to_numpy(np.uint8),
                kept["mirrored"].to_numpy(bool),
            )
        )
    first, second, distance, mirrored = (np.concatenate([p[i] for p in parts]) for i in range(4))
    order = np.lexsort((second, first))
    table = pair_frame(ids, first[order], second[order], distance[order], mirrored[order])
    return table, int((~known).sum())


def cache_keys(limit: int) -> dict[str, str]:
    """What the cached search depends on besides the hashes."""
    return {"search_version": SEARCH_VERSION, "phash_max_distance": str(limit)}


def read_last_search(limit: int, folder: Path = CACHE_DIR) -> LastSearch | None:
    """The last run's search when it was made the same way (else None: search everything).

    Both files carry the token of the run that wrote them, so a run killed between the two
    writes is not mistaken for a whole search.
    """
    try:
        searched_keys = common.parquet_keys(folder / SEARCHED_FILE, made_by=STAGE)
        found_keys = common.parquet_keys(folder / FOUND_FILE, made_by=STAGE)
        if searched_keys.get("token") != found_keys.get("token") or {
            k: searched_keys.get(k) for k in cache_keys(limit)
        } != cache_keys(limit):
            return None
        return LastSearch(
            pd.read_parquet(folder / SEARCHED_FILE), pd.read_parquet(folder / FOUND_FILE)
        )
    except (OSError, ValueError, common.UserError):
        return None


def write_last_search(
    manifest: pd.DataFrame, pairs: pd.DataFrame, limit: int, folder: Path = CACHE_DIR
) -> None:
    """Keep what this run searched and found, for the next run."""
    keys = {**cache_keys(limit), "token": uuid.uuid4().hex}
    common.write_parquet(pairs, folder / FOUND_FILE, keys)
    common.write_parquet(
        manifest[HASH_COLUMNS].reset_index(drop=True), folder / SEARCHED_FILE, keys
    )


def read_hash_pairs(path: Path = HASH_PAIRS_FILE) -> pd.DataFrame:
    """The pairs this stage wrote."""
    return common.read_parquet(path, made_by=STAGE)


def main() -> None:
    """Read the manifest; write the near pairs by perceptual hash."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = DuplicatesParams.from_params(settings.load_params())
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    limit = params.phash_max_distance
    pairs, searched = hash_pair_table(
        manifest, limit, common.worker_count(), read_last_search(limit)
    )
    common.write_parquet(pairs, HASH_PAIRS_FILE)
    write_last_search(manifest, pairs, limit)
    in_pairs = len(set(pairs["id_a"]) | set(pairs["id_b"]))
    logger.info(
        "%d images (%s): %d pairs within %d bits (%d mirrored), %d images in a pair; %.1f s",
        len(manifest),
        common.searched_words(searched, len(manifest)),
        len(pairs),
        params.phash_max_distance,
        int(pairs["mirrored"].sum()),
        in_pairs,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
