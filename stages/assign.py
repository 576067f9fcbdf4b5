"""assign: place every image with the fitted cluster model: its cluster and its (x, y) on
the 2-D map.

Params:  none (what it does is fixed by the model and the embeddings); compute.scheduler
         says where the placing runs (stages/compute.py)
Inputs:  models/cluster.joblib, data/processed/embeddings.parquet, data/interim/ids.parquet
Outputs: data/processed/clusters.parquet (id, cluster, x, y, fitted: whether the image was
         in the fit sample), reports/cluster/map.png

The images of the fit sample keep where the fit put them; every other image goes through
the model's transform and predict, a batch at a time. Placements are kept in
data/cache/assign/ by image sha256, under the model file's hash and the embeddings' key,
so with frozen models (`dvc freeze train cluster`) a run places only the new images, and
an image gets the same place whenever it arrived.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages import cluster_model, common, compute, settings
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
    done = start = 0
    for batch in common.embedding_batches(embeddings_file, BATCH_ROWS):
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
        start += len(batch)
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


def cluster_colors(count: int) -> np.ndarray:
    """`count` distinct RGB colors in 0..1: tab20 for up to 20 clusters, else evenly spaced hues."""
    from matplotlib import colormaps

    if count <= 20:
        return colormaps["tab20"](np.arange(count))[:, :3]
    return colormaps["hsv"](np.linspace(0, 1, count, endpoint=False))[:, :3]


def write_map(table: pd.DataFrame, path: Path, title: str) -> None:
    """A PNG scatter of the 2-D map, colored by cluster, each cluster labelled at its median."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    clustered = table[table["cluster"] != common.NOISE]
    count = int(clustered["cluster"].max()) + 1 if len(clustered) else 0
    colors = cluster_colors(max(count, 1))
    size = max(1.0, min(12.0, 20000 / max(len(table), 1)))
    figure, axes = pyplot.subplots(figsize=(9, 9), dpi=100)
    noise = table[table["cluster"] == common.NOISE]
    if len(noise):
        axes.scatter(noise["x"], noise["y"], s=size, c="lightgray", label="noise", linewidths=0)
    axes.scatter(
        clustered["x"],
        clustered["y"],
        s=size,
        c=colors[clustered["cluster"].to_numpy()],
        linewidths=0,
    )
    for cluster, members in clustered.groupby("cluster"):
        axes.annotate(
            str(cluster),
            (members["x"].median(), members["y"].median()),
            ha="center",
            va="center",
            fontsize=9,
            weight="bold",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0},
        )
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    with common.atomic_output(path) as temporary:
        # No software version or date in the file, so the same map gives the same bytes.
        figure.savefig(temporary, format="png", metadata={"Software": None})
    pyplot.close(figure)


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
    embed_key = common.parquet_keys(common.EMBEDDINGS_FILE, made_by="embed").get("embed_key", "")
    # The cache's name is its key: the model file's hash, what the embeddings came from,
    # and the version of how a new vector is placed.
    key = f"{file_key(common.CLUSTER_MODEL_FILE)}-{embed_key}-{cluster_model.PLACEMENT_VERSION}"
    cache = ContentCache(common.CACHE_DIR / STAGE / key, tuple(ARRAYS))
    summary = place_missing(common.CLUSTER_MODEL_FILE, common.EMBEDDINGS_FILE, sha256s, cache)
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
