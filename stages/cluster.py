"""cluster: fit the grouping of the latent vectors and the 2-D map, on a seeded sample.

Params:  ClusterParams below (params.yaml, section cluster)
Inputs:  data/processed/embeddings/, data/interim/ids.parquet (each row's sha256)
Outputs: models/cluster.joblib (the fitted ClusterModel: `predict` and `map_coordinates`
         take new latent vectors; it keeps the sample's own placements),
         metrics/cluster/k_curve.csv (k, score: the criterion of each k tried)

Fitting is kept apart from applying: the assign stage places every image with this model,
as the original project did, so a million images never need a million-point UMAP fit,
and with the model frozen (`dvc freeze cluster`) new images cost only their own placing.
Clusters are numbered by size, largest first; hdbscan's noise is cluster -1.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from stages import common, settings
from stages.cluster_model import (
    ClusterModel,
    Placements,
    import_umap,
    renumber,
    size_order,
    write_model,
)

STAGE = "cluster"
K_CURVE_FILE = common.METRICS_DIR / "cluster" / "k_curve.csv"

CRITERION_SAMPLE = 10000  # silhouette while choosing k is computed on at most this many points


# ----------------------------------------------------------------------------- params


class AutoParams(settings.Section):
    """cluster.auto: how n_clusters: auto picks the number of clusters."""

    min: int = Field(2, ge=2, description="the fewest clusters auto tries")
    max: int = Field(20, ge=2, description="the most clusters auto tries")
    criterion: Literal["silhouette", "calinski_harabasz", "davies_bouldin"] = Field(
        "silhouette", description="how auto judges each number of clusters"
    )


class UmapParams(settings.Section):
    """cluster.umap: UMAP's settings (n2d, hdbscan, and the 2-D map)."""

    n_neighbors: int = Field(15, ge=2, description="neighbours each image's graph links")
    min_dist: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="0 packs clusters tightly: better for clustering than for looks",
    )
    n_components: int = Field(
        10, ge=1, description="the space the clusters are found in; the map is always 2-D"
    )
    metric: Literal["euclidean", "cosine", "correlation", "manhattan", "chebyshev"] = Field(
        "euclidean", description="distance between latent vectors"
    )


class ClassicalParams(settings.Section):
    """cluster.classical: PCA, KMeans, then the centers merged by agglomerative clustering."""

    pca_components: int = Field(50, ge=1, description="PCA size")
    kmeans_clusters: int = Field(100, ge=1, description="KMeans centers, merged into n_clusters")
    linkage: Literal["ward", "complete", "average", "single"] = Field(
        "ward", description="how the centers merge"
    )


class HdbscanParams(settings.Section):
    """cluster.hdbscan: HDBSCAN's settings."""

    min_cluster_size: int = Field(15, ge=2, description="the smallest group that is a cluster")
    min_samples: int | None = Field(
        None, ge=1, description="how conservative the clustering is; null: min_cluster_size"
    )


class ClusterParams(settings.Section):
    """params.yaml, section cluster."""

    SECTION: ClassVar[str] = "cluster"
    method: Literal["n2d", "classical", "hdbscan"] = Field(
        "n2d",
        description="n2d: UMAP then kmeans or gmm; classical: PCA, KMeans, merged; "
        "hdbscan: UMAP then HDBSCAN (finds its own number, ignores n_clusters)",
    )
    n_clusters: int | Literal["auto"] = Field(
        10,
        description="the number of clusters, or auto: the best of auto.min..auto.max",
        json_schema_extra={"allowed": "expected an integer, or auto"},
    )
    assign: Literal["kmeans", "gmm"] = Field(
        "kmeans", description="n2d only: kmeans, or gmm (a Gaussian mixture)"
    )
    auto: AutoParams = Field(default_factory=AutoParams)
    umap: UmapParams = Field(default_factory=UmapParams)
    classical: ClassicalParams = Field(default_factory=ClassicalParams)
    hdbscan: HdbscanParams = Field(default_factory=HdbscanParams)
    fit_sample: int = Field(
        20000,
        ge=2,
        description="fit on at most this many images (seeded); assign places the rest",
    )
    random_state: int = Field(42, ge=0, description="seed of the sample, UMAP and the clustering")

    @field_validator("n_clusters")
    @classmethod
    def at_least_one(cls, value: int | str) -> int | str:
        """A fixed number of clusters is at least 1."""
        if isinstance(value, int) and value < 1:
            raise ValueError("expected an integer >= 1, or auto")
        return value

    @model_validator(mode="after")
    def auto_range(self) -> ClusterParams:
        """auto.max may not be below auto.min."""
        if self.auto.max < self.auto.min:
            raise settings.param_error(
                "cluster.auto.max",
                self.auto.max,
                f"it must be at least cluster.auto.min ({self.auto.min})",
            )
        return self

    @property
    def fixed_clusters(self) -> int | None:
        """n_clusters as a number; None for auto."""
        return None if self.n_clusters == "auto" else int(self.n_clusters)


def check_sizes(params: ClusterParams, fit_images: int) -> None:
    """Fail clearly when the params ask for more than `fit_images` images can give."""
    if fit_images < 2:
        raise common.UserError(f"clustering needs at least 2 images; there are {fit_images}")
    where = f"the fit has {fit_images} images"
    if (
        params.fixed_clusters is not None
        and params.fixed_clusters > fit_images
        and params.method != "hdbscan"
    ):
        raise settings.param_error(
            "cluster.n_clusters", params.fixed_clusters, f"{where}; ask for at most that many"
        )
    if params.fixed_clusters is None and params.auto.min >= fit_images:
        raise settings.param_error(
            "cluster.auto.min", params.auto.min, f"{where}; it must be below that"
        )
    if params.method != "classical" and params.umap.n_neighbors >= fit_images:
        raise settings.param_error(
            "cluster.umap.n_neighbors", params.umap.n_neighbors, f"{where}; it must be below that"
        )
    merged = params.method == "classical" and params.fixed_clusters is not None
    if merged and params.classical.kmeans_clusters < params.fixed_clusters:
        raise settings.param_error(
            "cluster.classical.kmeans_clusters",
            params.classical.kmeans_clusters,
            f"the KMeans centers are merged into cluster.n_clusters ({params.fixed_clusters}) "
            "groups, so there must be at least that many",
        )


# ----------------------------------------------------------------------------- fitting


def fit_umap(vectors: np.ndarray, params: ClusterParams, components: int) -> Any:
    """A UMAP fitted on `vectors` (seeded, so single-threaded and reproducible)."""
    reducer = import_umap().UMAP(
        n_neighbors=params.umap.n_neighbors,
        min_dist=params.umap.min_dist,
        n_components=components,
        # Interned: the file must not depend on whether this text is the same object as
        # UMAP's own "euclidean" (pickle writes a shared object once), which varies by process.
        metric=sys.intern(params.umap.metric),
        random_state=params.random_state,
        transform_seed=params.random_state,
    )
    with warnings.catch_warnings():
        # UMAP warns on every seeded run that it stays on one thread: that is the price
        # of reproducible results, not something for the user to act on.
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        reducer.fit(vectors)
    unplaced = int((~np.isfinite(reducer.embedding_)).any(axis=1).sum())
    if unplaced:
        # UMAP leaves an image it could not connect to any neighbour at NaN.
        raise common.UserError(
            f"UMAP could not place {unplaced} of {len(vectors)} images (they share no "
            "neighbour with the rest): raise cluster.umap.n_neighbors"
        )
    return reducer


def criterion_score(points: np.ndarray, labels: np.ndarray, criterion: str, seed: int) -> float:
    """How good a grouping of `points` is by `criterion` (silhouette on a seeded sample)."""
    from sklearn import metrics

    if criterion == "silhouette":
        sample = min(len(points), CRITERION_SAMPLE)
        return float(
            metrics.silhouette_score(points, labels, sample_size=sample, random_state=seed)
        )
    if criterion == "calinski_harabasz":
        return float(metrics.calinski_harabasz_score(points, labels))
    return float(metrics.davies_bouldin_score(points, labels))


def choose_k(
    candidates: list[int],
    labels_for_k: Callable[[int], np.ndarray],
    points: np.ndarray,
    criterion: str,
    seed: int,
) -> tuple[int, pd.DataFrame]:
    """The best k by `criterion` and the curve (k, score) of every candidate.

    Silhouette and Calinski-Harabasz are better higher, Davies-Bouldin lower; a tie goes
    to the smaller k.
    """
    scores = []
    for k in candidates:
        labels = labels_for_k(k)
        valid = len(np.unique(labels)) >= 2
        scores.append(criterion_score(points, labels, criterion, seed) if valid else np.nan)
    curve = pd.DataFrame({"k": candidates, "score": scores})
    sign = -1.0 if criterion == "davies_bouldin" else 1.0
    ranked = np.nan_to_num(sign * np.array(scores, dtype=float), nan=-np.inf)
    return candidates[int(np.argmax(ranked))], curve


def k_candidates(params: ClusterParams, fit_images: int) -> list[int]:
    """The k values to try: the fixed n_clusters, or auto.min..auto.max below the image count."""
    if params.fixed_clusters is not None:
        return [params.fixed_clusters]
    return list(range(params.auto.min, min(params.auto.max, fit_images - 1) + 1))


def fit_assigner(points: np.ndarray, k: int, assign: str, seed: int) -> Any:
    """KMeans or a Gaussian mixture with k groups, fitted on `points`."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    if assign == "gmm":
        return GaussianMixture(n_components=k, n_init=3, random_state=seed).fit(points)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)


@dataclass
class Fit:
    """A fitted model (with the sample's placements) and the k curve."""

    model: ClusterModel
    curve: pd.DataFrame


def fit_n2d(vectors: np.ndarray, params: ClusterParams) -> tuple[ClusterModel, np.ndarray, Any]:
    """UMAP, then KMeans or a Gaussian mixture; returns the model, raw labels, the embedding."""
    reducer = fit_umap(vectors, params, params.umap.n_components)
    points = reducer.embedding_.astype(np.float32)
    seed = params.random_state

    assigners: dict[int, Any] = {}  # each k's fit, so the chosen one is not fitted again

    def labels_for_k(k: int) -> np.ndarray:
        assigners[k] = fit_assigner(points, k, params.assign, seed)
        return assigners[k].predict(points)

    k, curve = choose_k(
        k_candidates(params, len(points)), labels_for_k, points, params.auto.criterion, seed
    )
    assigner = assigners[k]
    raw = assigner.predict(points)
    model = ClusterModel("n2d", reducer, assigner, None, size_order(raw), None)
    return model, raw, curve


def fit_classical(
    vectors: np.ndarray, params: ClusterParams
) -> tuple[ClusterModel, np.ndarray, pd.DataFrame]:
    """PCA, KMeans with many centers, then agglomerative merging of the centers.

    As the original's ClassicalClustering: an image belongs to the merged group of its
    KMeans center. Choosing k only re-cuts the merge tree, so auto costs little.
    """
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.decomposition import PCA

    seed = params.random_state
    components = min(params.classical.pca_components, vectors.shape[1], len(vectors))
    reducer = PCA(n_components=components, random_state=seed).fit(vectors)
    points = reducer.transform(vectors).astype(np.float32)
    centers = min(params.classical.kmeans_clusters, len(points))
    kmeans = KMeans(n_clusters=centers, n_init=10, random_state=seed).fit(points)
    center_of = kmeans.labels_

    def merge_for_k(k: int) -> np.ndarray:
        if k >= centers:
            return np.arange(centers)
        merger = AgglomerativeClustering(n_clusters=k, linkage=params.classical.linkage)
        return merger.fit_predict(kmeans.cluster_centers_)

    k, curve = choose_k(
        k_candidates(params, centers + 1),
        lambda k: merge_for_k(k)[center_of],
        points,
        params.auto.criterion,
        seed,
    )
    merge = merge_for_k(k)
    raw = merge[center_of]
    model = ClusterModel("classical", reducer, kmeans, merge, size_order(raw), None)
    return model, raw, curve


def fit_hdbscan(
    vectors: np.ndarray, params: ClusterParams
) -> tuple[ClusterModel, np.ndarray, pd.DataFrame]:
    """UMAP, then HDBSCAN (scikit-learn's); noise is -1.

    HDBSCAN cannot predict, so new images take the label most common among their 5 nearest
    fitted points in the UMAP space (noise included).
    """
    from sklearn.cluster import HDBSCAN
    from sklearn.neighbors import KNeighborsClassifier

    reducer = fit_umap(vectors, params, params.umap.n_components)
    points = reducer.embedding_.astype(np.float32)
    raw = HDBSCAN(
        min_cluster_size=params.hdbscan.min_cluster_size,
        min_samples=params.hdbscan.min_samples,
        copy=True,
    ).fit_predict(points)
    voter = KNeighborsClassifier(n_neighbors=min(5, len(points))).fit(points, raw)
    found = len(np.unique(raw[raw != common.NOISE]))
    curve = pd.DataFrame({"k": [found], "score": [np.nan]})
    if found >= 2:
        kept = raw != common.NOISE
        score = criterion_score(points[kept], raw[kept], params.auto.criterion, params.random_state)
        curve["score"] = [score]
    model = ClusterModel("hdbscan", reducer, voter, None, size_order(raw), None)
    return model, raw, curve


FITTERS = {"n2d": fit_n2d, "classical": fit_classical, "hdbscan": fit_hdbscan}


def fit_clusters(sample: np.ndarray, sha256s: list[str], params: ClusterParams) -> Fit:
    """Fit the chosen method and the 2-D map on the sample's vectors (`sha256s` names
    their files); the model keeps where the fit put them."""
    check_sizes(params, len(sample))
    model, raw, curve = FITTERS[params.method](sample, params)
    if params.method == "classical" or params.umap.n_components != 2:
        model.mapper = fit_umap(sample, params, 2)
        sample_xy = model.mapper.embedding_
    else:
        sample_xy = model.reducer.embedding_
    clusters = renumber(raw, model.order)
    model.fitted = Placements.first_of_each(sha256s, clusters, sample_xy.astype(np.float32))
    return Fit(model, curve)


def main() -> None:
    """Read params and a seeded sample of the embeddings; fit; write the model and the curve."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = ClusterParams.from_params(settings.load_params())
    ids, sha256s, _ = common.read_image_keys(common.embedding_ids())
    # One image per near-duplicate group: its copies would weigh on the fit as if they were
    # different images. assign places them with the model like any other image.
    candidates = np.flatnonzero(~common.read_near_copies(ids))
    rows = candidates[common.sample_rows(len(candidates), params.fit_sample, params.random_state)]
    sample = common.read_embedding_rows(common.EMBEDDINGS_DIR, rows)
    fit = fit_clusters(sample, [sha256s[row] for row in rows], params)
    write_model(fit.model, common.CLUSTER_MODEL_FILE)
    common.write_csv(fit.curve, K_CURVE_FILE)
    fitted = fit.model.fitted
    assert fitted is not None
    found = len(np.unique(fitted.clusters[fitted.clusters != common.NOISE]))
    logger.info(
        "%s: %d clusters, fit on %d of %d images (%d near-duplicate copies left out, "
        "%d noise); %.1f s",
        params.method,
        found,
        len(rows),
        len(ids),
        len(ids) - len(candidates),
        int((fitted.clusters == common.NOISE).sum()),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    # Run the importable module's main, so that the pickled model names its class
    # stages.cluster.ClusterModel (loadable anywhere), not __main__.ClusterModel.
    from stages import cluster

    common.run_stage(cluster.main)
