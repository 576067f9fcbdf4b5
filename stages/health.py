"""health: what is wrong with the collection, image by image: near-duplicate groups, quality
flags, how unusual each image is, and every image's nearest neighbours.

Params:  HealthParams below (params.yaml, section health)
Inputs:  data/raw/manifest.parquet (sync's scores), data/processed/hash_pairs.parquet,
         data/processed/embeddings/, data/processed/split.parquet,
         data/interim/thumbs/ + ids.parquet
Outputs: data/processed/health.parquet (one row per image, see HEALTH_COLUMNS),
         data/processed/near_groups.parquet (its id, near_group, near_of and near_size:
         what cluster and score read, so that a flag threshold reruns neither),
         data/processed/neighbors.parquet (id, neighbors, distances: the k nearest in
         the latent space, nearest first), metrics/health.json (counts),
         reports/health/ (near-NNN.png: a mosaic per near-duplicate group, largest first,
         its representative first; flag-NAME.png: each flag's worst images; groups.csv),
         reports/unusual.csv and reports/unusual.png (the most unusual images)

Near-duplicates: two images are a pair when their perceptual hashes are near (the
duplicates stage) or when they are among each other's k nearest neighbours in the latent
space and nearer than latent_near_share of the median distance between two images (the
same scene with small changes). Groups are the connected components of the pairs; each
group's representative (near_of) is its largest image (pixels, then bytes, then id).
Blank frames join no group. Quality flags compare sync's scores with the thresholds below;
odd_size compares each image's side with the collection's median. How unusual an image is:
its distance to its k-th nearest neighbour.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from stages import common, duplicates, mosaics, near_search, neighbour_lists, settings, thumbnails

STAGE = "health"
HEALTH_FILE = common.PROCESSED_DIR / "health.parquet"
NEIGHBORS_FILE = common.NEIGHBORS_FILE
HEALTH_METRICS_FILE = common.METRICS_DIR / "health.json"
REPORT_DIR = Path("reports/health")
UNUSUAL_FILE = Path("reports/unusual.csv")
UNUSUAL_MOSAIC_FILE = Path("reports/unusual.png")
DISTANCE_SAMPLE = 2000  # random pairs whose median distance sets the latent scale
# Each flag: the manifest score it reads, and whether low scores are the bad ones.
FLAG_SCORES = {
    "dark": ("dark", True),
    "light": ("light", False),
    "blurry": ("sharpness", True),
    "low_information": ("entropy", True),
    "grayscale": ("colorfulness", True),
    "odd_aspect": ("aspect", False),
    "odd_size": ("size_distance", False),
}
HEALTH_COLUMNS = [
    "id",
    "near_group",  # the group's number (1 = largest), 0 for an image in no group
    "near_of",  # the group's representative (null for the representative and the alone)
    "near_size",  # images in its group (1 when alone)
    "unusual",  # distance to its k-th nearest neighbour in the latent space
    "aspect",  # long side / short side
    "size_ratio",  # its side (square root of its pixels) / the collection's median side
    "blank",
    *(flag for flag in FLAG_SCORES),
    "flagged",  # any flag, blank included
]


class HealthParams(settings.Section):
    """params.yaml, section health."""

    SECTION: ClassVar[str] = "health"
    neighbors: int = Field(10, ge=1, le=100, description="nearest neighbours kept per image")
    latent_near_share: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="neighbours nearer than this share of the median distance between two "
        "images in the latent space are near-duplicates too (0, the default: the hash alone; "
        "see the README before raising it)",
    )
    exact_below: int = Field(
        20000,
        ge=2,
        description="exact nearest neighbours below this many images; an approximate index "
        "(pynndescent) from there",
    )
    dark_max: float = Field(
        0.15, ge=0, le=1, allow_inf_nan=False, description="dark: the brightest 1% below this"
    )
    light_min: float = Field(
        0.85, ge=0, le=1, allow_inf_nan=False, description="light: the darkest 5% above this"
    )
    blurry_max: float = Field(
        5.0,
        ge=0,
        allow_inf_nan=False,
        description="blurry: edge strength (Laplacian std on a 256 px gray copy) below this",
    )
    low_information_max: float = Field(
        1.5,
        ge=0,
        le=8,
        allow_inf_nan=False,
        description="low information: entropy below this, bits",
    )
    grayscale_max: float = Field(
        0.02,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="grayscale: mean spread between a pixel's channels below this",
    )
    aspect_max: float = Field(
        2.5, ge=1, allow_inf_nan=False, description="odd aspect: long side / short side above this"
    )
    size_factor: float = Field(
        4.0,
        gt=1,
        allow_inf_nan=False,
        description="odd size: a side this many times smaller or larger than the median side",
    )
    mosaic_groups: int = Field(20, ge=0, description="mosaics of the largest groups")
    mosaic_side: int = Field(6, ge=1, description="a mosaic shows up to side x side images")
    unusual: int = Field(100, ge=0, description="the most unusual images listed")
    seed: int = Field(42, ge=0, description="seed of the approximate index and the scale")


# ----------------------------------------------------------------------------- scores


def quality_flags(manifest: pd.DataFrame, params: HealthParams) -> pd.DataFrame:
    """aspect, size_ratio, the flags of FLAG_SCORES, blank and flagged, in manifest order."""
    width = manifest["width"].to_numpy(dtype=np.float64)
    height = manifest["height"].to_numpy(dtype=np.float64)
    side = np.sqrt(width * height)
    size_ratio = side / np.median(side) if len(side) else side
    table = pd.DataFrame(
        {
            "aspect": np.maximum(width, height) / np.maximum(np.minimum(width, height), 1),
            "size_ratio": size_ratio,
            "blank": manifest["blank"].to_numpy(dtype=bool),
        }
    )
    table["dark"] = manifest["dark"].to_numpy() <= params.dark_max
    table["light"] = manifest["light"].to_numpy() >= params.light_min
    table["blurry"] = manifest["sharpness"].to_numpy() < params.blurry_max
    table["low_information"] = manifest["entropy"].to_numpy() < params.low_information_max
    table["grayscale"] = manifest["colorfulness"].to_numpy() < params.grayscale_max
    table["odd_aspect"] = table["aspect"] > params.aspect_max
    table["odd_size"] = np.abs(np.log(np.maximum(size_ratio, 1e-12))) > np.log(params.size_factor)
    table["flagged"] = table[["blank", *FLAG_SCORES]].any(axis=1)
    return table


def latent_scale(vectors: np.ndarray, seed: int) -> float:
    """The median distance between two images: seeded random pairs of rows."""
    if len(vectors) < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(vectors), DISTANCE_SAMPLE)
    second = rng.integers(0, len(vectors), DISTANCE_SAMPLE)
    apart = first != second
    if not apart.any():
        return 0.0
    differences = vectors[first[apart]].astype(np.float64) - vectors[second[apart]]
    return float(np.median(np.sqrt((differences**2).sum(axis=1))))


def latent_pairs(
    indices: np.ndarray, distances: np.ndarray, limit: float, usable: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b) of usable rows that are neighbours within `limit`."""
    rows = np.repeat(np.arange(len(indices)), indices.shape[1])
    others = indices.ravel()
    near = (distances.ravel() <= limit) & (others >= 0)
    rows, others = rows[near], others[near]
    keep = usable[rows] & usable[others]
    first, second = np.minimum(rows, others)[keep], np.maximum(rows, others)[keep]
    pairs = np.unique(np.stack([first, second], axis=1), axis=0) if len(first) else np.empty((0, 2))
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def near_groups(manifest: pd.DataFrame, first: np.ndarray, second: np.ndarray) -> pd.DataFrame:
    """near_group, near_of and near_size of every image from pairs of rows (see the module
    docstring), in manifest order."""
    count = len(manifest)
    component = near_search.groups_of_pairs(count, first, second)
    component_sizes = np.bincount(component, minlength=count)
    sizes = component_sizes[component]
    pixels = manifest["width"].to_numpy(np.int64) * manifest["height"].to_numpy(np.int64)
    order = pd.DataFrame(
        {
            "component": component,
            "pixels": -pixels,
            "bytes": -manifest["bytes"].to_numpy(np.int64),
            "id": manifest["id"].astype(str).to_numpy(),
        }
    ).sort_values(["component", "pixels", "bytes", "id"])
    representative_row = order.groupby("component", sort=False).head(1)
    representative_of = pd.Series(
        representative_row.index.to_numpy(), representative_row["component"]
    )
    representative = representative_of[component].to_numpy()
    ids = manifest["id"].astype(str).to_numpy()
    grouped = sizes > 1
    # Groups numbered by size, largest first, ties by their first row; 0 for the alone.
    heads = np.unique(component[grouped])
    ranked = heads[np.lexsort((heads, -component_sizes[heads]))]
    number_of = np.zeros(count, dtype=np.int64)
    number_of[ranked] = np.arange(1, len(ranked) + 1)
    return pd.DataFrame(
        {
            "near_group": number_of[component],
            "near_of": pd.Series(
                np.where(grouped & (representative != np.arange(count)), ids[representative], None),
                dtype="str",
            ),
            "near_size": sizes.astype(np.int64),
        }
    )


def straddling_groups(groups: pd.DataFrame, subsets: pd.Series) -> int:
    """Near-duplicate groups whose images sit in more than one subset."""
    grouped = groups["near_group"] > 0
    if not grouped.any():
        return 0
    spread = subsets[grouped.to_numpy()].groupby(groups["near_group"][grouped].to_numpy()).nunique()
    return int((spread > 1).sum())


# ----------------------------------------------------------------------------- outputs


def farthest_neighbour(distances: np.ndarray) -> np.ndarray:
    """Each row's distance to its k-th neighbour (its farthest listed one in a collection of
    k images or fewer; 0 with none)."""
    finite = np.where(np.isfinite(distances), distances, -np.inf)
    farthest = finite.max(axis=1, initial=-np.inf)
    return np.where(np.isfinite(farthest), farthest, 0.0).astype(np.float32)


def neighbor_table(ids: list[str], indices: np.ndarray, distances: np.ndarray) -> pa.Table:
    """id, neighbors (their ids), distances: the k nearest of each image, nearest first."""
    names = pa.array(ids, pa.string())
    valid = indices >= 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
    neighbours = names.take(pa.array(indices[valid]))
    rounded = np.round(distances[valid].astype(np.float64), 6).astype(np.float32)
    return pa.table(
        {
            "id": names,
            "neighbors": pa.ListArray.from_arrays(offsets, neighbours),
            "distances": pa.ListArray.from_arrays(offsets, pa.array(rounded, pa.float32())),
        }
    )


def worst_rows(table: pd.DataFrame, manifest: pd.DataFrame, flag: str, count: int) -> np.ndarray:
    """The rows of `flag`'s images, worst score first (ties by row), at most `count`."""
    score_column, low_is_bad = FLAG_SCORES[flag]
    if score_column == "size_distance":
        scores = np.abs(np.log(np.maximum(table["size_ratio"].to_numpy(), 1e-12)))
    elif score_column == "aspect":
        scores = table["aspect"].to_numpy()
    else:
        scores = manifest[score_column].to_numpy(dtype=np.float64)
    rows = np.flatnonzero(table[flag].to_numpy())
    keys = scores[rows] if low_is_bad else -scores[rows]
    return rows[np.lexsort((rows, keys))][:count]


def write_report(
    health: pd.DataFrame,
    manifest: pd.DataFrame,
    thumbs: thumbnails.ThumbnailRows,
    thumb_row: np.ndarray,
    params: HealthParams,
) -> None:
    """reports/health/: a mosaic per largest group and per flag, and groups.csv."""
    shown = params.mosaic_side**2
    sets: dict[str, np.ndarray] = {}
    grouped = health[health["near_group"] > 0]
    for number in range(1, params.mosaic_groups + 1):
        members = grouped[grouped["near_group"] == number]
        if members.empty:
            break
        representative_first = members.assign(alone=members["near_of"].notna()).sort_values(
            ["alone", "id"]
        )
        sets[f"near-{number:03d}"] = representative_first.index.to_numpy()[:shown]
    for flag in ["blank", *FLAG_SCORES]:
        rows = (
            np.flatnonzero(health["blank"].to_numpy())[:shown]
            if flag == "blank"
            else worst_rows(health, manifest, flag, shown)
        )
        if len(rows):
            sets[f"flag-{flag}"] = rows
    pictures, picked = thumbnails.pick(
        thumbs, {index: thumb_row[rows] for index, rows in enumerate(sets.values())}
    )
    with common.replace_folder(REPORT_DIR) as staging:
        mosaics.save_pngs(
            {
                staging / f"{name}.png": mosaics.mosaic(pictures[picked[index]], params.mosaic_side)
                for index, name in enumerate(sets)
            },
            common.worker_count(),
        )
        summary = grouped.groupby("near_group").size().rename("size").reset_index()
        representatives = grouped[grouped["near_of"].isna()].set_index("near_group")["id"]
        summary["representative"] = summary["near_group"].map(representatives)
        common.write_csv(summary, staging / "groups.csv")


def health_metrics(
    health: pd.DataFrame, hash_pair_count: int, latent_pair_count: int, straddling: int
) -> dict[str, Any]:
    """Flat counts for metrics/health.json."""
    grouped = health["near_group"] > 0
    metrics: dict[str, Any] = {
        "near_groups": int(health.loc[grouped, "near_group"].nunique()),
        "near_images": int(grouped.sum()),
        "near_copies": int((grouped & health["near_of"].notna()).sum()),
        "near_groups_straddling": straddling,
        "hash_pairs": hash_pair_count,
        "latent_pairs": latent_pair_count,
        "flagged": int(health["flagged"].sum()),
        "blank": int(health["blank"].sum()),
        "latent_vectors_checked": len(health),
    }
    for flag in FLAG_SCORES:
        metrics[flag] = int(health[flag].sum())
    return metrics


# ----------------------------------------------------------------------------- main


def main() -> None:
    """Read the manifest, the hash pairs, the embeddings and the split; write the health
    table, the neighbours, the metrics and the reports."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = HealthParams.from_params(settings.load_params())
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync").reset_index(drop=True)
    ids, vectors = common.read_embeddings()  # embed has checked them: finite, not constant
    thumb_row_of = pd.Series(np.arange(len(ids)), index=ids)
    if set(ids) != set(manifest["id"].tolist()):
        raise common.UserError(
            f"{common.EMBEDDINGS_DIR} and {common.MANIFEST_FILE} list different images: "
            "run `dvc repro`"
        )
    thumb_row = thumb_row_of[manifest["id"]].to_numpy()
    # Both are in manifest order as the stages write them: no copy of every vector then.
    in_order = np.array_equal(thumb_row, np.arange(len(ids)))
    manifest_vectors = vectors if in_order else vectors[thumb_row]

    search = neighbour_lists.SearchSettings(params.neighbors, params.exact_below, params.seed)
    indices, distances, searched = neighbour_lists.neighbour_lists(
        manifest["id"].astype(str).tolist(), manifest_vectors, search, common.worker_count()
    )
    usable = ~manifest["blank"].to_numpy(dtype=bool)
    limit = params.latent_near_share * latent_scale(manifest_vectors, params.seed)
    latent_first, latent_second = latent_pairs(indices, distances, limit, usable)
    hash_pairs = duplicates.read_hash_pairs()
    row_of = pd.Series(np.arange(len(manifest)), index=manifest["id"].astype(str))
    hash_first = row_of[hash_pairs["id_a"]].to_numpy(np.int64)
    hash_second = row_of[hash_pairs["id_b"]].to_numpy(np.int64)
    groups = near_groups(
        manifest,
        np.concatenate([hash_first, latent_first]),
        np.concatenate([hash_second, latent_second]),
    )
    flags = quality_flags(manifest, params)
    unusual = farthest_neighbour(distances)
    health = pd.concat(
        [manifest[["id"]], groups, pd.DataFrame({"unusual": unusual.astype(np.float64)}), flags],
        axis=1,
    )[HEALTH_COLUMNS]
    split = common.read_parquet(common.SPLIT_FILE, made_by="split").set_index("id")["subset"]
    straddling = straddling_groups(groups, split.reindex(manifest["id"]).reset_index(drop=True))

    common.write_parquet(health, HEALTH_FILE)
    common.write_parquet(
        health[["id", "near_group", "near_of", "near_size"]], common.NEAR_GROUPS_FILE
    )
    common.write_arrow_parquet(
        neighbor_table(manifest["id"].astype(str).tolist(), indices, distances), NEIGHBORS_FILE
    )
    metrics = health_metrics(health, len(hash_pairs), len(latent_first), straddling)
    common.write_json(metrics, HEALTH_METRICS_FILE)
    thumbs = thumbnails.load(ids)
    write_report(health, manifest, thumbs, thumb_row, params)
    unusual_rows = np.lexsort((np.arange(len(health)), -unusual))[: params.unusual]
    unusual_table = health.iloc[unusual_rows][["id", "unusual", "near_group", "flagged"]]
    unusual_table.insert(1, "path", manifest["path"].iloc[unusual_rows].to_numpy())
    common.write_csv(unusual_table, UNUSUAL_FILE)
    pictures = thumbs[thumb_row[unusual_rows[: params.mosaic_side**2]]]
    mosaics.save_png_atomically(mosaics.mosaic(pictures, params.mosaic_side), UNUSUAL_MOSAIC_FILE)
    logger.info(
        "%d images (%s): %d "
        "near-duplicate groups holding %d images (%d hash pairs, %d latent pairs, %d groups "
        "across subsets); flagged %s; %.1f s",
        len(health),
        common.searched_words(searched, len(health), "searched for neighbours"),
        metrics["near_groups"],
        metrics["near_images"],
        metrics["hash_pairs"],
        metrics["latent_pairs"],
        straddling,
        ", ".join(f"{metrics[flag]} {flag}" for flag in ["blank", *FLAG_SCORES]),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
