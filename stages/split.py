"""split: put every image in the train, test or valid subset, and count the collection.

Params:  SplitParams below (params.yaml, section split)
Inputs:  data/raw/manifest.parquet, data/raw/rejected.csv, data/processed/hash_pairs.parquet
Outputs: data/processed/split.parquet (id, subset), metrics/data.json (counts)

Each image's subset comes from a hash of its id and the seed, never from its row, so
adding images never moves an image already assigned. Copies go where their group goes:
a byte-identical duplicate and every near-duplicate (the duplicates stage's pairs, joined
into groups) take the subset of the group's first image in manifest order, so the same
picture never sits on both sides of an evaluation. (A new image that joins two groups, or
comes first in its group, can move that group.)
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Annotated, ClassVar

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from stages import common, duplicates, near_search, settings

STAGE = "split"
SUBSETS = ("train", "test", "valid")


Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class Proportions(settings.Section):
    """The share of the collection each subset gets."""

    train: Share = Field(0.7, description="share of images the model is trained on")
    test: Share = Field(0.2, description="share held out to report the test loss")
    valid: Share = Field(0.1, description="share that decides early stopping")


class SplitParams(settings.Section):
    """params.yaml, section split."""

    SECTION: ClassVar[str] = "split"
    proportions: Proportions = Field(
        default_factory=Proportions,
        description="train, test and valid shares, summing to 1",
        json_schema_extra={"allowed": "expected shares for exactly train, test and valid"},
    )
    seed: int = Field(42, ge=0, description="seed of the id hash that places each image")

    @model_validator(mode="after")
    def shares_sum_to_one(self) -> SplitParams:
        """The three shares must cover the collection exactly."""
        total = sum(self.proportions.model_dump().values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise settings.param_error(
                "split.proportions",
                self.proportions.model_dump(),
                f"the shares sum to {round(total, 6)}; they must sum to 1",
            )
        return self


def id_position(image_id: str, seed: int) -> float:
    """A number in [0, 1) that depends only on the id and the seed."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def group_owners(manifest: pd.DataFrame, pairs: pd.DataFrame | None) -> np.ndarray:
    """Each image's group owner: the first image in manifest order of the group that
    byte-identical copies (duplicate_of) and near pairs (id_a, id_b) join it into."""
    ids = manifest["id"].astype(str).to_numpy()
    row_of = pd.Series(np.arange(len(ids)), index=ids)
    links = [(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))]
    if "duplicate_of" in manifest:
        copies = manifest["duplicate"].astype(bool).to_numpy()
        links.append((np.flatnonzero(copies), row_of[manifest["duplicate_of"][copies]].to_numpy()))
    if pairs is not None and len(pairs):
        known = common.is_among(pairs["id_a"], row_of.index) & common.is_among(
            pairs["id_b"], row_of.index
        )
        links.append(
            (row_of[pairs["id_a"][known]].to_numpy(), row_of[pairs["id_b"][known]].to_numpy())
        )
    first = np.concatenate([np.asarray(a, dtype=np.int64) for a, _ in links])
    second = np.concatenate([np.asarray(b, dtype=np.int64) for _, b in links])
    return ids[near_search.groups_of_pairs(len(ids), first, second)]


def assign_subsets(
    manifest: pd.DataFrame, params: SplitParams, pairs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """A table of (id, subset) in manifest order.

    The hash position of the id of its group's owner (see group_owners) falls in one of
    the consecutive ranges train, test, valid, sized by the proportions.
    """
    bounds = np.cumsum([getattr(params.proportions, subset) for subset in SUBSETS])
    bounds[-1] = 1.0  # so that rounding never leaves a position past the last range
    owner = group_owners(manifest, pairs)
    positions = np.array([id_position(str(image_id), params.seed) for image_id in owner])
    subset_index = np.searchsorted(bounds, positions, side="right")
    subsets = np.array(SUBSETS)[np.minimum(subset_index, len(SUBSETS) - 1)]
    return pd.DataFrame({"id": manifest["id"].to_numpy(), "subset": subsets})


def data_metrics(manifest: pd.DataFrame, rejected: pd.DataFrame, split: pd.DataFrame) -> dict:
    """Flat counts for metrics/data.json: images, rejects, flags, metadata and subsets."""
    subset_counts = split["subset"].value_counts()
    metrics = {
        "images": len(manifest),
        "rejected": len(rejected),
        "blank": int(manifest["blank"].sum()),
        "duplicate": int(manifest["duplicate"].sum()),
        "with_taken_at": int(manifest["taken_at"].notna().sum()),
        "with_location": int(manifest["latitude"].notna().sum()),
        "with_label": int(manifest["label"].notna().sum()),
    }
    for subset in SUBSETS:
        metrics[f"subset_{subset}"] = int(subset_counts.get(subset, 0))
    return metrics


def main() -> None:
    """Read params and the manifest, write the split and the data metrics."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = SplitParams.from_params(settings.load_params())
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    if not common.REJECTED_FILE.exists():
        raise common.UserError(f"{common.REJECTED_FILE} is missing: run `dvc repro sync` first")
    rejected = pd.read_csv(common.REJECTED_FILE)
    split = assign_subsets(manifest, params, duplicates.read_hash_pairs())
    common.write_parquet(split, common.SPLIT_FILE)
    metrics = data_metrics(manifest, rejected, split)
    common.write_json(metrics, common.DATA_METRICS_FILE)
    logger.info(
        "%d images: %s; %.1f s",
        len(split),
        ", ".join(f"{metrics[f'subset_{subset}']} {subset}" for subset in SUBSETS),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
