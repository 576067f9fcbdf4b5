"""split: put every image in the train, test or valid subset, and count the collection.

Params (params.yaml): split.proportions (train, test, valid shares summing to 1), split.seed
Inputs:  data/raw/manifest.parquet, data/raw/rejected.csv
Outputs: data/processed/split.parquet (id, subset), metrics/data.json (counts)

Each image's subset comes from a hash of its id and the seed, never from its row, so
adding images never moves an image already assigned. A byte-identical duplicate goes
where its original goes, so the same picture never sits on both sides of an evaluation.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stages import common

STAGE = "split"
SUBSETS = ("train", "test", "valid")


@dataclass(frozen=True)
class SplitParams:
    """The split section of params.yaml, checked."""

    proportions: dict[str, float]
    seed: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SplitParams:
        """Read and check the split params."""
        key = "split.proportions"
        raw = common.get_param(params, key)
        if not isinstance(raw, dict) or set(raw) != set(SUBSETS):
            raise common.param_error(key, raw, "expected shares for exactly train, test and valid")
        proportions = {
            subset: common.number_param(params, f"{key}.{subset}", minimum=0, maximum=1)
            for subset in SUBSETS
        }
        if not math.isclose(sum(proportions.values()), 1.0, abs_tol=1e-6):
            total = round(sum(proportions.values()), 6)
            raise common.param_error(key, raw, f"the shares sum to {total}; they must sum to 1")
        return cls(proportions=proportions, seed=common.int_param(params, "split.seed", minimum=0))


def id_position(image_id: str, seed: int) -> float:
    """A number in [0, 1) that depends only on the id and the seed."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_subsets(manifest: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """A table of (id, subset) in manifest order.

    The id's hash position falls in one of the consecutive ranges train, test, valid,
    sized by the proportions. Duplicates take their original's subset.
    """
    bounds = np.cumsum([params.proportions[subset] for subset in SUBSETS])
    bounds[-1] = 1.0  # so that rounding never leaves a position past the last range
    owner = manifest["id"]
    if "duplicate_of" in manifest:
        owner = manifest["duplicate_of"].where(manifest["duplicate"].astype(bool), manifest["id"])
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
    params = SplitParams.from_params(common.load_params())
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    if not common.REJECTED_FILE.exists():
        raise common.UserError(f"{common.REJECTED_FILE} is missing: run `dvc repro sync` first")
    rejected = pd.read_csv(common.REJECTED_FILE)
    split = assign_subsets(manifest, params)
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
