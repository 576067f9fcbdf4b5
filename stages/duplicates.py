"""duplicates: find the pairs of images whose perceptual hashes are near, before the split,
so that near-copies of one picture never sit on both sides of an evaluation.

Params:  DuplicatesParams below (params.yaml, section duplicates)
Inputs:  data/raw/manifest.parquet (phash, phash_mirror, blank)
Outputs: data/processed/hash_pairs.parquet (id_a, id_b, distance, mirrored; id_a < id_b
         in manifest order)

sync measures every image's pHash (64 bits from the lowest frequencies of a DCT) and the
pHash of its mirror image. Two images are a pair when their hashes differ in at most
phash_max_distance bits, either as they are or with one mirrored: this finds resized,
re-encoded, brightened, lightly cropped and mirrored copies. On the tests' photo-like
scenes, 8 bits group every such copy and no look-alike, 4 bits 81% of the pairs; the
default is 4 because the demo's 8x8 digits hash so coarsely that distinct digits come
within 8 (the README's presets for photos use 8). Blank frames (sync's flag)
are left out: every black frame hashes alike. The search is exact, in blocks of rows on
every core. The health stage joins these pairs with nearness in the latent space.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import pandas as pd
from pydantic import Field

from stages import common, near_search, settings

STAGE = "duplicates"
HASH_PAIRS_FILE = common.PROCESSED_DIR / "hash_pairs.parquet"


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


def hash_pair_table(manifest: pd.DataFrame, limit: int, workers: int) -> pd.DataFrame:
    """The near pairs of the manifest's images (see the module docstring)."""
    hashes = near_search.hash_values(manifest["phash"].tolist())
    mirrors = near_search.hash_values(manifest["phash_mirror"].tolist())
    usable = ~manifest["blank"].to_numpy(dtype=bool)
    first, second, distance, mirrored = near_search.hash_pairs(
        hashes, mirrors, usable, limit, workers
    )
    ids = manifest["id"].to_numpy()
    return pd.DataFrame(
        {
            "id_a": pd.Series(ids[first], dtype="str"),
            "id_b": pd.Series(ids[second], dtype="str"),
            "distance": pd.Series(distance, dtype="int8"),
            "mirrored": pd.Series(mirrored, dtype="bool"),
        }
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
    pairs = hash_pair_table(manifest, params.phash_max_distance, common.worker_count())
    common.write_parquet(pairs, HASH_PAIRS_FILE)
    in_pairs = len(set(pairs["id_a"]) | set(pairs["id_b"]))
    logger.info(
        "%d images: %d pairs within %d bits (%d mirrored), %d images in a pair; %.1f s",
        len(manifest),
        len(pairs),
        params.phash_max_distance,
        int(pairs["mirrored"].sum()),
        in_pairs,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
