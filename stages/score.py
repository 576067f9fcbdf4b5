"""score: say how clean each cluster is, and show it.

Params:  ScoreParams below (params.yaml, section score)
Inputs:  data/processed/embeddings/, data/processed/clusters.parquet,
         data/raw/manifest.parquet (labels, paths), data/interim/thumbs/ + ids.parquet
Outputs: metrics/cluster.json (flat: silhouette, Calinski-Harabasz, Davies-Bouldin, sizes,
         noise share; accuracy, ARI and NMI where the manifest has labels),
         metrics/silhouette.csv (per cluster, a `dvc plots` bar chart),
         data/processed/scores.parquet (id, silhouette, center_distance),
         reports/mosaics/ (cluster-NNN.png, overview.png), reports/outliers.csv,
         reports/outliers.png

Silhouettes are measured on the latent space, as in the original project, so methods
that cluster in different spaces are compared on the same ground. Noise (-1) has none.
They are measured against a reference: the cluster fit sample (at most
score.silhouette_sample of it, chosen by file content), so with frozen models an image's
silhouette never changes; data/cache/score/ keeps them by file sha256, and a run computes
only the new images'. The cheap scores (centers, Calinski-Harabasz, Davies-Bouldin) are
computed over every image each run.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from stages import common, mosaics, settings, thumbnails
from stages.silhouettes import cached_silhouettes, reference_rows, silhouette_cache_key

STAGE = "score"
CLUSTER_METRICS_FILE = common.METRICS_DIR / "cluster.json"
SILHOUETTE_FILE = common.METRICS_DIR / "silhouette.csv"
MOSAICS_DIR = Path("reports/mosaics")
OUTLIERS_FILE = Path("reports/outliers.csv")
OUTLIERS_MOSAIC_FILE = Path("reports/outliers.png")
DISTANCE_BLOCK = 2048  # images whose distances to the centers are held at once
SCORE_DECIMALS = 9  # silhouettes and center distances are written rounded to this
OVERVIEW_THUMBS = 12  # thumbnails per cluster on the overview sheet
OVERVIEW_LABEL_WIDTH = 150
OUTLIERS = -2  # the key of the outliers' rows among the clusters' (noise is -1)
# Cluster mosaics of earlier runs, by key (mosaic_keys): a daily run draws only those whose
# images changed.
MOSAIC_CACHE_DIR = common.CACHE_DIR / STAGE / "mosaics"


class ScoreParams(settings.Section):
    """params.yaml, section score."""

    SECTION: ClassVar[str] = "score"
    silhouette_sample: int = Field(
        20000,
        ge=2,
        description="silhouettes are measured against at most this many images of the "
        "cluster fit sample (seeded, chosen by file content); exact when the fit sample "
        "holds every image and is no larger",
    )
    mosaic_side: int = Field(10, ge=1, description="a mosaic shows up to side x side thumbnails")
    outliers: int = Field(
        100, ge=0, description="how many lowest-silhouette images reports/outliers.csv lists"
    )
    seed: int = Field(42, ge=0, description="seed of the silhouette sample")


# ----------------------------------------------------------------------------- scores


def cluster_centers(vectors: np.ndarray, clusters: np.ndarray) -> dict[int, np.ndarray]:
    """The mean latent vector of each cluster (noise excluded)."""
    return {
        int(cluster): vectors[clusters == cluster].mean(axis=0)
        for cluster in np.unique(clusters[clusters != common.NOISE])
    }


def reference_centers(
    vectors: np.ndarray, clusters: np.ndarray, reference: np.ndarray
) -> dict[int, np.ndarray]:
    """Each cluster's center: the mean of its images among the `reference` rows (the
    silhouette reference, from the cluster fit sample), which stays still while frozen
    models place new images, so an earlier image's distance and the mosaics' order keep;
    the mean of all its images for a cluster the reference misses."""
    centers = cluster_centers(vectors[reference], clusters[reference])
    missing = (clusters != common.NOISE) & ~np.isin(clusters, list(centers))
    if missing.any():
        centers.update(cluster_centers(vectors[missing], clusters[missing]))
    return centers


def center_distances(
    vectors: np.ndarray, clusters: np.ndarray, centers: dict[int, np.ndarray]
) -> np.ndarray:
    """Each image's distance to its cluster's center; for noise, to the nearest center.

    Works a block of images at a time and one center at a time for noise, so memory stays
    at a block of vectors whatever the number of clusters.
    """
    if not centers:
        return np.full(len(vectors), np.nan)
    numbers = np.array(sorted(centers))
    matrix = np.stack([centers[number] for number in numbers])
    result = np.empty(len(vectors))
    for start in range(0, len(vectors), DISTANCE_BLOCK):
        block = vectors[start : start + DISTANCE_BLOCK].astype(np.float64)
        own = clusters[start : start + DISTANCE_BLOCK]
        noise = own == common.NOISE
        column = np.minimum(np.searchsorted(numbers, own), len(numbers) - 1)
        distances = np.sqrt(((block - matrix[column]) ** 2).sum(axis=1))
        if noise.any():
            nearest = np.full(int(noise.sum()), np.inf)
            for center in matrix:
                nearest = np.minimum(nearest, np.sqrt(((block[noise] - center) ** 2).sum(axis=1)))
            distances[noise] = nearest
        result[start : start + len(block)] = distances
    return result


def hungarian_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to labels (Hungarian).

    Clusters left without a label (more clusters than labels), and noise, count as wrong.
    """
    from scipy.optimize import linear_sum_assignment

    true_codes, true_index = np.unique(truth, return_inverse=True)
    predicted_codes, predicted_index = np.unique(predicted, return_inverse=True)
    contingency = np.zeros((len(predicted_codes), len(true_codes)), dtype=np.int64)
    np.add.at(contingency, (predicted_index, true_index), 1)
    noise_row = np.flatnonzero(predicted_codes == common.NOISE)
    contingency[noise_row] = 0
    rows, columns = linear_sum_assignment(contingency, maximize=True)
    return float(contingency[rows, columns].sum() / len(truth))


def label_agreement(labels: pd.Series, clusters: np.ndarray) -> dict[str, float]:
    """Accuracy (Hungarian), ARI and NMI against ground-truth labels, over labelled images."""
    known = labels.notna().to_numpy()
    if not known.any():
        return {}
    from sklearn import metrics  # 2 s to import: only for a collection with labels

    truth = labels[known].astype(str).to_numpy()
    predicted = clusters[known]
    return {
        "accuracy": hungarian_accuracy(truth, predicted),
        "ari": float(metrics.adjusted_rand_score(truth, predicted)),
        "nmi": float(metrics.normalized_mutual_info_score(truth, predicted)),
        "labelled_images": int(known.sum()),
    }


def silhouette_table(clusters: np.ndarray, silhouettes: np.ndarray) -> pd.DataFrame:
    """Per cluster: size and mean silhouette, in cluster order (noise excluded)."""
    frame = pd.DataFrame({"cluster": clusters, "silhouette": silhouettes})
    frame = frame[frame["cluster"] != common.NOISE]
    table = frame.groupby("cluster").agg(
        size=("cluster", "size"), silhouette=("silhouette", "mean")
    )
    return table.reset_index()


def dispersion_scores(
    vectors: np.ndarray, clusters: np.ndarray, kept: np.ndarray
) -> tuple[float, float]:
    """Calinski-Harabasz and Davies-Bouldin scores of the kept rows' clusters (at least two),
    as scikit-learn defines them, in one pass over blocks of rows.

    Written out rather than called from scikit-learn, which takes a copy of the vectors
    and, with its import, took 2.6 s of score's 14 s at 100,000 images.
    """
    codes, members = np.unique(clusters[kept], return_inverse=True)
    rows = np.flatnonzero(kept)
    count, dimensions = len(rows), vectors.shape[1]
    sizes = np.bincount(members, minlength=len(codes)).astype(np.float64)
    sums = np.zeros((len(codes), dimensions))
    for start in range(0, count, DISTANCE_BLOCK):
        block = vectors[rows[start : start + DISTANCE_BLOCK]].astype(np.float64)
        owners = members[start : start + DISTANCE_BLOCK]
        membership = np.zeros((len(codes), len(block)))
        membership[owners, np.arange(len(block))] = 1.0
        sums += membership @ block
    centroids = sums / sizes[:, None]
    overall = sums.sum(axis=0) / count
    spread_sums = np.zeros(len(codes))  # per cluster: summed distance to its centroid
    within = 0.0  # summed squared distance of each row to its cluster's centroid
    for start in range(0, count, DISTANCE_BLOCK):
        block = vectors[rows[start : start + DISTANCE_BLOCK]].astype(np.float64)
        owners = members[start : start + DISTANCE_BLOCK]
        squared = ((block - centroids[owners]) ** 2).sum(axis=1)
        within += float(squared.sum())
        spread_sums += np.bincount(owners, weights=np.sqrt(squared), minlength=len(codes))
    between = float((sizes * ((centroids - overall) ** 2).sum(axis=1)).sum())
    clusters_count = len(codes)
    calinski_harabasz = (
        1.0 if within == 0 else between * (count - clusters_count) / (within * (clusters_count - 1))
    )
    spreads = spread_sums / sizes
    gaps = np.sqrt(((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2))
    if np.allclose(spreads, 0) or np.allclose(gaps, 0):
        return float(calinski_harabasz), 0.0
    gaps[gaps == 0] = np.inf
    davies_bouldin = float(np.mean(np.max((spreads[:, None] + spreads[None, :]) / gaps, axis=1)))
    return float(calinski_harabasz), davies_bouldin


def cluster_metrics(
    vectors: np.ndarray,
    clusters: np.ndarray,
    silhouettes: np.ndarray,
    per_cluster: pd.DataFrame,
    labels: pd.Series,
) -> dict[str, Any]:
    """The flat metrics of metrics/cluster.json (None where a score is undefined)."""
    kept = clusters != common.NOISE
    found = len(per_cluster)
    values: dict[str, Any] = {
        "n_clusters": found,
        "noise_share": float(1.0 - kept.mean()) if len(clusters) else 0.0,
        "size_min": int(per_cluster["size"].min()) if found else 0,
        "size_median": float(per_cluster["size"].median()) if found else 0.0,
        "size_max": int(per_cluster["size"].max()) if found else 0,
        "silhouette": None,
        "silhouette_cluster_min": None,
        "calinski_harabasz": None,
        "davies_bouldin": None,
    }
    if found >= 2:
        values["silhouette"] = float(np.nanmean(silhouettes))
        values["silhouette_cluster_min"] = float(per_cluster["silhouette"].min())
        calinski_harabasz, davies_bouldin = dispersion_scores(vectors, clusters, kept)
        values["calinski_harabasz"] = calinski_harabasz
        values["davies_bouldin"] = davies_bouldin
    values.update(label_agreement(labels, clusters))
    return {key: round_value(value) for key, value in values.items()}


def round_value(value: Any) -> Any:
    """Floats to 6 significant digits, so metrics diffs show changes, not noise."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def outlier_table(scores: pd.DataFrame, count: int) -> pd.DataFrame:
    """Noise first (farthest from any center first), then the `count` lowest silhouettes."""
    noise = scores[scores["cluster"] == common.NOISE].sort_values(
        ["center_distance", "id"], ascending=[False, True]
    )
    clustered = scores[scores["cluster"] != common.NOISE].dropna(subset=["silhouette"])
    lowest = clustered.sort_values(["silhouette", "id"]).head(count)
    table = pd.concat(
        [noise.assign(reason="noise"), lowest.assign(reason="low silhouette")], ignore_index=True
    )
    return table[["id", "path", "cluster", "silhouette", "center_distance", "reason"]]


# ----------------------------------------------------------------------------- pictures


def overview_sheet(
    thumbs: thumbnails.ThumbnailRows,
    rows_by_cluster: dict[int, np.ndarray],
    per_cluster: pd.DataFrame,
) -> Image.Image:
    """One line per cluster: its number, size and silhouette, then its most central images."""
    height, width = thumbs.shape[1:3]
    line_height = height + mosaics.GUTTER
    sheet = Image.new(
        "RGB",
        (
            OVERVIEW_LABEL_WIDTH + OVERVIEW_THUMBS * (width + mosaics.GUTTER) + mosaics.GUTTER,
            max(1, len(rows_by_cluster)) * line_height + mosaics.GUTTER,
        ),
        (24, 24, 24),
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=max(10, min(16, height // 3)))
    silhouette_of = per_cluster.set_index("cluster")["silhouette"]
    size_of = per_cluster.set_index("cluster")["size"]
    for line, (cluster, rows) in enumerate(sorted(rows_by_cluster.items())):
        top = mosaics.GUTTER + line * line_height
        text = f"{cluster}: {size_of[cluster]} img\nsil {silhouette_of[cluster]:.2f}"
        draw.multiline_text((6, top + 2), text, fill=(235, 235, 235), font=font)
        strip = mosaics.mosaic(thumbs[rows[:OVERVIEW_THUMBS]], OVERVIEW_THUMBS)
        sheet.paste(strip, (OVERVIEW_LABEL_WIDTH, top - mosaics.GUTTER))
    return sheet


def central_rows(
    clusters: np.ndarray, distances: np.ndarray, ids: list[str], copies: np.ndarray | None = None
) -> dict[int, np.ndarray]:
    """Row numbers of each cluster's images, nearest its center first (ties by id), without
    the near-duplicate `copies` (a mosaic shows one image of each group)."""
    order = np.lexsort((np.array(ids, dtype=str), distances))
    kept = clusters[order] != common.NOISE
    if copies is not None:
        kept &= ~np.asarray(copies, bool)[order]
    order = order[kept]
    if not len(order):
        return {}
    # Grouped by cluster, nearest first within each (a stable sort keeps the order), the
    # clusters in the order their nearest image comes.
    grouped = order[np.argsort(clusters[order], kind="stable")]
    labels = clusters[grouped]
    runs = np.split(grouped, np.flatnonzero(np.diff(labels)) + 1)
    place = np.empty(len(clusters), np.int64)
    place[order] = np.arange(len(order))
    runs.sort(key=lambda rows: place[rows[0]])
    return {int(clusters[rows[0]]): rows.astype(np.int64) for rows in runs}


def mosaic_keys(
    rows_by_cluster: dict[int, np.ndarray], side: int, thumbs: Any, sha256s: list[str]
) -> dict[int, str]:
    """Each cluster mosaic's key: what its bytes depend on, without drawing it: the files
    it shows (by sha256, in order), the thumbnails' key (how prepare made them), the side,
    and the code that draws it. Empty when the thumbnails carry no key (an array)."""
    thumbs_key = getattr(thumbs, "key", "")
    if not thumbs_key:
        return {}
    code = hashlib.sha256(Path(mosaics.__file__).read_bytes()).hexdigest()
    keys = {}
    for cluster, rows in rows_by_cluster.items():
        digest = hashlib.sha256(f"{code} {thumbs_key} {side}".encode())
        for row in rows[: side * side]:
            digest.update(sha256s[int(row)].encode())
        keys[cluster] = digest.hexdigest()[:32]
    return keys


def write_mosaics(
    thumbs: thumbnails.ThumbnailRows,
    rows_by_cluster: dict[int, np.ndarray],
    per_cluster: pd.DataFrame,
    side: int,
    directory: Path,
    kept: dict[int, Path] | None = None,
) -> dict[int, Path]:
    """A mosaic per cluster and the overview sheet, replacing the folder as a whole; the
    clusters of `kept` are copied from those files instead of drawn. Returns each
    cluster's mosaic file."""
    kept = kept or {}
    digits = max(3, len(str(max(rows_by_cluster, default=0))))
    names = {cluster: f"cluster-{cluster:0{digits}d}.png" for cluster in rows_by_cluster}
    with common.replace_folder(directory) as staging:
        pictures = {
            staging / names[cluster]: mosaics.mosaic(thumbs[rows[: side * side]], side)
            for cluster, rows in rows_by_cluster.items()
            if cluster not in kept
        }
        pictures[staging / "overview.png"] = overview_sheet(thumbs, rows_by_cluster, per_cluster)
        mosaics.save_pngs(pictures, common.worker_count())
        for cluster, path in kept.items():
            shutil.copyfile(path, staging / names[cluster])
    return {cluster: directory / name for cluster, name in names.items()}


# ----------------------------------------------------------------------------- main


@dataclass
class ScoreResult:
    """What score computes, and main writes."""

    metrics: dict[str, Any]  # flat, for metrics/cluster.json
    per_cluster: pd.DataFrame  # cluster, size, silhouette: metrics/silhouette.csv
    scores: pd.DataFrame  # id, cluster, silhouette, center_distance
    outliers: pd.DataFrame  # the lowest-silhouette images (reports/outliers.csv)
    mosaic_rows: dict[int, np.ndarray]  # rows of each cluster's mosaic, most central first
    outlier_rows: np.ndarray  # rows of the outliers mosaic


def score_clusters(
    ids: list[str],
    vectors: np.ndarray,
    clusters: np.ndarray,
    silhouettes: np.ndarray,
    manifest: pd.DataFrame,
    params: ScoreParams,
    copies: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> ScoreResult:
    """Center distances, metrics, outliers and mosaic choices of a clustering whose
    silhouettes are given.

    `manifest` is indexed by id and gives each image's path and label; `copies` marks the
    near-duplicate copies the mosaics leave out; `reference` (every row when None) the rows
    whose means are the clusters' centers (see reference_centers).
    """
    reference = np.arange(len(vectors)) if reference is None else reference
    distances = center_distances(vectors, clusters, reference_centers(vectors, clusters, reference))
    # BLAS kernels and numpy's SIMD sums differ between CPU kinds in the last bits;
    # rounded, the same embeddings give the same scores' bytes on every machine.
    silhouettes = np.round(silhouettes, SCORE_DECIMALS)
    distances = np.round(distances, SCORE_DECIMALS)
    per_cluster = silhouette_table(clusters, silhouettes)
    labels = manifest["label"].reindex(ids)
    metrics = cluster_metrics(vectors, clusters, silhouettes, per_cluster, labels)
    scores = pd.DataFrame(
        {
            "id": ids,
            "path": manifest["path"].reindex(ids).to_numpy(),
            "cluster": clusters,
            "silhouette": silhouettes,
            "center_distance": distances,
        }
    )
    outliers = outlier_table(scores, params.outliers)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    outlier_rows = np.array([row_of[i] for i in outliers["id"]][: params.mosaic_side**2], dtype=int)
    return ScoreResult(
        metrics=metrics,
        per_cluster=per_cluster,
        scores=scores.drop(columns=["path"]),
        outliers=outliers,
        mosaic_rows=central_rows(clusters, distances, ids, copies),
        outlier_rows=outlier_rows,
    )


def main() -> None:
    """Read the embeddings and clusters; write the scores, metrics, mosaics and outliers."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = ScoreParams.from_params(settings.load_params())
    ids, vectors = common.read_embeddings()
    table = common.read_parquet(common.CLUSTERS_FILE, made_by="assign")
    if table["id"].tolist() != ids:
        raise common.UserError(
            f"{common.CLUSTERS_FILE} does not match {common.EMBEDDINGS_DIR}: run `dvc repro assign`"
        )
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync").set_index("id")
    _, sha256s, _ = common.read_image_keys(ids)
    clusters = table["cluster"].to_numpy()
    reference = reference_rows(
        clusters, table["fitted"].to_numpy(), sha256s, params.silhouette_sample, params.seed
    )
    assign_key = common.parquet_keys(common.CLUSTERS_FILE, made_by="assign").get("assign_key")
    key = silhouette_cache_key(assign_key, [sha256s[row] for row in reference])
    per_image, computed = cached_silhouettes(vectors, clusters, reference, sha256s, key)
    copies = common.read_near_copies(ids)
    result = score_clusters(ids, vectors, clusters, per_image, manifest, params, copies, reference)
    metrics = result.metrics
    common.write_json(metrics, CLUSTER_METRICS_FILE)
    common.write_csv(result.per_cluster, SILHOUETTE_FILE)
    common.write_parquet(result.scores, common.SCORES_FILE)
    common.write_csv(result.outliers, OUTLIERS_FILE)
    # Only the thumbnails the pictures show are decoded: the first rows of each cluster
    # whose mosaic is not kept from an earlier run, the overview's, the outliers.
    stored = thumbnails.load(ids)
    keys = mosaic_keys(result.mosaic_rows, params.mosaic_side, stored, sha256s)
    kept = mosaics.kept_mosaics(keys, MOSAIC_CACHE_DIR)
    shown = max(params.mosaic_side**2, OVERVIEW_THUMBS)
    row_sets = {
        cluster: rows[: OVERVIEW_THUMBS if cluster in kept else shown]
        for cluster, rows in result.mosaic_rows.items()
    }
    thumbs, picked = thumbnails.pick(stored, {**row_sets, OUTLIERS: result.outlier_rows})
    outlier_rows = picked.pop(OUTLIERS)
    files = write_mosaics(thumbs, picked, result.per_cluster, params.mosaic_side, MOSAICS_DIR, kept)
    mosaics.keep_mosaics(files, keys, MOSAIC_CACHE_DIR)
    mosaics.save_png_atomically(
        mosaics.mosaic(thumbs[outlier_rows], params.mosaic_side), OUTLIERS_MOSAIC_FILE
    )
    agreement = ""
    if "accuracy" in metrics:
        agreement = (
            f"; against labels: accuracy {metrics['accuracy']}, ARI {metrics['ari']}, "
            f"NMI {metrics['nmi']}"
        )
    logger.info(
        "%d images in %d clusters (%d silhouettes computed against %d reference images, "
        "the others from the cache): silhouette %s, Calinski-Harabasz %s, Davies-Bouldin %s%s; "
        "%d outliers listed; %d of %d cluster mosaics kept from the last run; %.1f s",
        len(ids),
        metrics["n_clusters"],
        computed,
        len(reference),
        metrics["silhouette"],
        metrics["calinski_harabasz"],
        metrics["davies_bouldin"],
        agreement,
        len(result.outliers),
        len(kept),
        len(result.mosaic_rows),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
