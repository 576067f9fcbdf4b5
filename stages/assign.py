"""assign: place every image with the fitted cluster model: its cluster and its (x, y) on
the 2-D map.

Params:  none (what it does is fixed by the model and the embeddings); compute.scheduler
         says where the placing runs (stages/compute.py)
Inputs:  models/cluster.joblib, data/processed/embeddings/, data/interim/ids.parquet
Outputs: data/processed/clusters.parquet (id, cluster, x, y, fitted: whether the image was
         in the fit sample), reports/cluster/map.png

The images of the fit sample keep where the fit put them; every other image goes through
the model's transform and predict, a batch at a time. Placements are kept in
data/cache/assign/ by image sha256, under the model file's hash and the embeddings' key,
so with frozen models (`dvc freeze train cluster`) a run places only the new images, and
an image gets the same place whenever it arrived.
"""

from __future__ import annotations

import colorsys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from stages import cluster_model, common, compute, mosaics, settings
from stages.cluster_model import ClusterModel, load_model
from stages.content_cache import ContentCache, file_key

STAGE = "assign"
MAP_FILE = Path("reports/cluster/map.png")
BATCH_ROWS = 65536  # embeddings read at once
TASK_ROWS = 4096  # embeddings placed per task
ARRAYS = {"cluster": ((), np.int32), "xy": ((2,), np.float32), "fitted": ((), np.bool_)}


@dataclass
class AssignSummary:
    """Counts of what one assign run did, over distinct image files."""

    placed: int  # through the model's transform and predict
    from_fit: int  # images of the fit sample, placed by the fit itself
    from_cache: int


def place(
    model: ClusterModel, vectors: np.ndarray, sha256s: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster numbers, (x, y) map positions and fit-sample flags of latent vectors
    (`sha256s` names their files): where the fit put the files of its sample, the model's
    transform for the rest."""
    clusters = np.empty(len(vectors), dtype=np.int32)
    xy = np.empty((len(vectors), 2), dtype=np.float32)
    fitted_row = (
        {}
        if model.fitted is None
        else {sha: row for row, sha in enumerate(model.fitted.sha256.tolist())}
    )
    from_fit = np.array([sha in fitted_row for sha in sha256s], dtype=bool)
    if from_fit.any():
        rows = [fitted_row[sha] for sha, hit in zip(sha256s, from_fit) if hit]
        clusters[from_fit] = model.fitted.clusters[rows]
        xy[from_fit] = model.fitted.xy[rows]
    if not from_fit.all():
        clusters[~from_fit], xy[~from_fit] = model.predict_with_map(vectors[~from_fit])
    return clusters, xy, from_fit


@dataclass(frozen=True)
class PlaceTask:
    """Latent vectors to place with the model file (on this process or a Dask worker)."""

    model_file: Path
    vectors: np.ndarray
    sha256s: list[str]


def place_task(task: PlaceTask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place a task's vectors (see place)."""
    return place(compute.load_once(task.model_file, load_model), task.vectors, task.sha256s)


def place_missing(
    model_file: Path, embeddings_file: Path, sha256s: list[str], cache: ContentCache
) -> AssignSummary:
    """Place the images the cache lacks (each distinct file once) into a new segment of it.

    The vectors are read a batch at a time and placed TASK_ROWS a task, here or on the
    workers of compute.scheduler. The model is loaded only when there is something to
    place: loading it imports UMAP.
    """
    distinct = len(set(sha256s))
    missing, rows = cache.missing_rows(sha256s)
    if not missing:
        return AssignSummary(0, 0, distinct)
    clusters = np.empty(len(missing), dtype=np.int32)
    xy = np.empty((len(missing), 2), dtype=np.float32)
    fitted = np.empty(len(missing), dtype=np.bool_)
    done = 0
    wanted = np.sort(rows)
    for start, batch in common.embedding_batches_holding(embeddings_file, wanted, BATCH_ROWS):
        chosen = rows[(rows >= start) & (rows < start + len(batch))]
        tasks = [
            PlaceTask(model_file, batch[part - start], [sha256s[row] for row in part])
            for part in np.split(chosen, range(TASK_ROWS, len(chosen), TASK_ROWS))
            if len(part)
        ]
        for task_clusters, task_xy, task_fitted in compute.map_tasks(place_task, tasks, 1):
            done_after = done + len(task_clusters)
            clusters[done:done_after], xy[done:done_after] = task_clusters, task_xy
            fitted[done:done_after] = task_fitted
            done = done_after
    cache.add(missing, {"cluster": clusters, "xy": xy, "fitted": fitted})
    from_fit = int(fitted.sum())
    return AssignSummary(len(missing) - from_fit, from_fit, distinct - len(missing))


def clusters_table(ids: list[str], sha256s: list[str], cache: ContentCache) -> pd.DataFrame:
    """The (id, cluster, x, y, fitted) table of every image, in embeddings order, from the
    cache."""
    columns = {
        name: np.concatenate([np.empty((0, *shape), dtype), *cache.row_blocks(sha256s, name)])
        for name, (shape, dtype) in ARRAYS.items()
    }
    xy = columns["xy"]
    return pd.DataFrame(
        {
            "id": ids,
            "cluster": columns["cluster"],
            "x": xy[:, 0],
            "y": xy[:, 1],
            "fitted": columns["fitted"],
        }
    )


# matplotlib's tab20 colors: distinct for up to 20 clusters.
TAB20 = [
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
    (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
    (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (127, 127, 127),
    (199, 199, 199), (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
]  # fmt: skip
NOISE_COLOR = (200, 200, 200)
MAP_SIDE = 900  # pixels of the square map
MAP_MARGIN = 20  # pixels around the points
TITLE_HEIGHT = 30


def cluster_colors(count: int) -> np.ndarray:
    """`count` distinct RGB colors (uint8): tab20 for up to 20 clusters, else evenly
    spaced hues."""
    if count <= len(TAB20):
        return np.array(TAB20[:count], dtype=np.uint8).reshape(-1, 3)
    hues = [colorsys.hsv_to_rgb(index / count, 0.85, 0.9) for index in range(count)]
    return np.round(np.array(hues) * 255).astype(np.uint8)


def map_positions(x: np.ndarray, y: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel columns and rows of map coordinates on a `side`-pixel square, y upwards, the
    points' bounding box filling it."""

    def scaled(values: np.ndarray) -> np.ndarray:
        low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        span = high - low if high > low else 1.0
        return np.clip(((values - low) / span * (side - 1)).round(), 0, side - 1).astype(int)

    return scaled(x), side - 1 - scaled(y)


def write_map(table: pd.DataFrame, path: Path, title: str) -> None:
    """A PNG of the 2-D map, a dot per image colored by cluster (noise gray, drawn first),
    each cluster numbered at its median. Drawn with numpy and Pillow: matplotlib took two
    seconds at 100,000 images, a run with few new images paying most of it."""
    clusters = table["cluster"].to_numpy()
    clustered = clusters != common.NOISE
    count = int(clusters[clustered].max()) + 1 if clustered.any() else 0
    colors = np.vstack([cluster_colors(max(count, 1)), np.array([NOISE_COLOR], np.uint8)])
    side = MAP_SIDE - 2 * MAP_MARGIN
    columns, rows = map_positions(table["x"].to_numpy(), table["y"].to_numpy(), side)
    canvas = np.full((side + 2, side + 2, 3), 255, dtype=np.uint8)
    dot = 1 if len(table) > 20000 else 2 if len(table) > 2000 else 3
    order = np.argsort(clustered, kind="stable")  # noise first, under the clusters
    color_rows = np.where(clustered, clusters, len(colors) - 1)[order]
    for down in range(dot):
        for right in range(dot):
            canvas[
                np.minimum(rows[order] + down, side + 1),
                np.minimum(columns[order] + right, side + 1),
            ] = colors[color_rows]
    picture = Image.new("RGB", (MAP_SIDE, MAP_SIDE + TITLE_HEIGHT), (255, 255, 255))
    picture.paste(Image.fromarray(canvas), (MAP_MARGIN - 1, TITLE_HEIGHT + MAP_MARGIN - 1))
    draw = ImageDraw.Draw(picture)
    draw.text((MAP_MARGIN, 6), title, fill=(0, 0, 0), font=ImageFont.load_default(size=16))
    font = ImageFont.load_default(size=12)
    for cluster in np.unique(clusters[clustered]):
        members = clusters == cluster
        center = (
            MAP_MARGIN + float(np.median(columns[members])),
            TITLE_HEIGHT + MAP_MARGIN + float(np.median(rows[members])),
        )
        box = draw.textbbox(center, str(cluster), font=font, anchor="mm")
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(255, 255, 255))
        draw.text(center, str(cluster), fill=(0, 0, 0), font=font, anchor="mm")
    with common.atomic_output(path) as temporary:
        mosaics.save_png(picture, temporary)


def main() -> None:
    """Place what the cache lacks; write every image's placement and the map."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    compute.use_params(settings.load_params())
    ids, sha256s, _ = common.read_image_keys(common.embedding_ids())
    if not common.CLUSTER_MODEL_FILE.exists():
        raise common.UserError(
            f"{common.CLUSTER_MODEL_FILE} is missing: run `dvc repro cluster` first"
        )
    embed_key = common.parquet_keys(common.EMBEDDINGS_DIR, made_by="embed").get("embed_key", "")
    # The cache's name is its key: the model file's hash, what the embeddings came from,
    # and the version of how a new vector is placed.
    key = f"{file_key(common.CLUSTER_MODEL_FILE)}-{embed_key}-{cluster_model.PLACEMENT_VERSION}"
    cache = ContentCache(common.CACHE_DIR / STAGE / key, tuple(ARRAYS))
    summary = place_missing(common.CLUSTER_MODEL_FILE, common.EMBEDDINGS_DIR, sha256s, cache)
    table = clusters_table(ids, sha256s, cache)
    # Score keys its own cache on this: what placed every image.
    common.write_parquet(table, common.CLUSTERS_FILE, keys={"assign_key": key})
    clustered = table["cluster"][table["cluster"] != common.NOISE]
    found = int(clustered.max()) + 1 if len(clustered) else 0
    write_map(table, MAP_FILE, f"{found} clusters of {len(table)} images")
    logger.info(
        "%d images: %d placed by the model, %d by the fit, %d from the cache; "
        "%d clusters, %d noise; %.1f s",
        len(ids),
        summary.placed,
        summary.from_fit,
        summary.from_cache,
        found,
        len(table) - len(clustered),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    # Run the importable module's main, so that the tasks sent to a Dask cluster name
    # their functions stages.assign.*, which the cluster can import, not __main__.*.
    from stages import assign

    common.run_stage(assign.main)
