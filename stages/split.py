"""split: put every image in the train, test or valid subset, and count the collection.

Params:  SplitParams below (params.yaml, section split)
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
from typing import Annotated, ClassVar

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from stages import common, settings

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


def assign_subsets(manifest: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """A table of (id, subset) in manifest order.

    The id's hash position falls in one of the consecutive ranges train, test, valid,
    sized by the proportions. Duplicates take their original's subset.
    """
    bounds = np.cumsum([getattr(params.proportions, subset) for subset in SUBSETS])
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
    params = SplitParams.from_params(settings.load_params())
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
