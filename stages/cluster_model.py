"""The fitted clustering the cluster stage saves: `ClusterModel` (reduce, predict and map
new latent vectors), pickled so that the file's bytes depend only on the fit and loading
it needs neither UMAP nor numba (a fitted UMAP is saved as a `FittedUmap`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from stages import common


@dataclass
class Placements:
    """Where images went: a cluster number and an (x, y) map position per image file,
    keyed by the file's sha256."""

    sha256: np.ndarray  # str
    clusters: np.ndarray  # int32
    xy: np.ndarray  # float32, (images, 2)

    @classmethod
    def first_of_each(cls, sha256s: list[str], clusters: np.ndarray, xy: np.ndarray) -> Placements:
        """The placements of each distinct file, taken from its first row."""
        _, first = np.unique(np.asarray(sha256s), return_index=True)
        first = np.sort(first)
        return cls(np.asarray(sha256s)[first], clusters[first], xy[first])


@dataclass
class ClusterModel:
    """A fitted clustering, reusable on new latent vectors (pickled to models/cluster.joblib).

    reducer:  vectors -> the space the clusters live in (UMAP or PCA)
    assigner: that space -> raw labels (KMeans, a Gaussian mixture, or for HDBSCAN a
              nearest-neighbour vote among the fitted points)
    merge:    classical only: KMeans center -> merged group
    order:    raw label -> cluster number (by size, largest first); noise stays -1
    mapper:   vectors -> 2-D map; None when the reducer is already 2-D
    fitted:   the fit sample's own placements, which its images keep (a transform of a
              fitted point lands near, not on, where the fit put it)
    """

    method: str
    reducer: Any
    assigner: Any
    merge: np.ndarray | None
    order: dict[int, int]
    mapper: Any
    fitted: Placements | None = None

    def reduce(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors in the space the clusters were found in."""
        return project(self.reducer, vectors)

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """The cluster number of each latent vector."""
        return self.clusters_of(self.reduce(vectors))

    def clusters_of(self, points: np.ndarray) -> np.ndarray:
        """The cluster number of each point of the reduced space."""
        raw = self.assigner.predict(points)
        if self.merge is not None:
            raw = self.merge[raw]
        return renumber(raw, self.order)

    def map_coordinates(self, vectors: np.ndarray) -> np.ndarray:
        """(x, y) of each latent vector on the 2-D map."""
        return project(self.reducer if self.mapper is None else self.mapper, vectors)

    def predict_with_map(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cluster numbers and (x, y) map positions, transforming each vector only once
        when the clusters live on the map itself."""
        points = self.reduce(vectors)
        if self.mapper is None:
            return self.clusters_of(points), points
        return self.clusters_of(points), project(self.mapper, vectors)

    def __getstate__(self) -> dict[str, Any]:
        """The state to pickle: a fitted UMAP as the FittedUmap, a KMeans as the
        FittedKMeans that placing needs."""
        state = dict(vars(self))
        state["reducer"] = FittedUmap.of(self.reducer)
        state["mapper"] = FittedUmap.of(self.mapper)
        state["assigner"] = FittedKMeans.of(self.assigner)
        return state


@dataclass
class FittedUmap:
    """What place_with_umap needs of a fitted UMAP, under UMAP's own attribute names: the
    fitted vectors, their places, the neighbour count, the local connectivity and the
    metric.

    The model file holds this rather than the UMAP object: loading one imports neither
    UMAP nor numba (1.6 s of every assign run), and its bytes depend only on the fit
    (numba pickles compiled functions with an id drawn afresh in every process).
    """

    _raw_data: np.ndarray
    embedding_: np.ndarray
    _n_neighbors: int
    local_connectivity: float
    metric: str

    @classmethod
    def of(cls, estimator: Any) -> Any:
        """The FittedUmap of a fitted UMAP; any other estimator (PCA, None) as it is."""
        if estimator is None or not hasattr(estimator, "_raw_data"):
            return estimator
        return cls(
            np.asarray(estimator._raw_data),
            np.asarray(estimator.embedding_),
            int(estimator._n_neighbors),
            float(estimator.local_connectivity),
            str(estimator.metric),
        )


@dataclass
class FittedKMeans:
    """What predicting needs of a fitted KMeans: its centers.

    The model file holds this rather than scikit-learn's object: loading one does not
    import scikit-learn's clustering (0.8 s of every assign run). It labels a point as
    KMeans.predict does: the nearest center by |c|^2 - 2 x.c in the centers' precision,
    the first of equals.
    """

    cluster_centers_: np.ndarray

    @classmethod
    def of(cls, estimator: Any) -> Any:
        """The FittedKMeans of a fitted KMeans; any other assigner as it is."""
        if type(estimator).__name__ != "KMeans" or not hasattr(estimator, "cluster_centers_"):
            return estimator
        return cls(np.asarray(estimator.cluster_centers_))

    def predict(self, points: np.ndarray) -> np.ndarray:
        """The label (center number) of each point."""
        centers = self.cluster_centers_
        points = np.asarray(points, dtype=centers.dtype)
        squared = np.einsum("ij,ij->i", centers, centers)  # as scikit-learn's row_norms
        distances = squared[None, :] - 2 * (points @ centers.T)
        return distances.argmin(axis=1).astype(np.int32)


PLACE_BLOCK = 256  # new vectors measured against the fitted ones at once
# Part of assign's cache key: change it with any change to where place_with_umap puts a
# vector. 2: smooth_knn_dist in numpy (UMAP's numba version placed within 3e-5 of it);
# 3: euclidean distances in numpy (distances_to).
PLACEMENT_VERSION = "place3"


def project(estimator: Any, vectors: np.ndarray) -> np.ndarray:
    """New vectors through a fitted reducer: UMAP by place_with_umap, others (PCA) by
    their own transform."""
    if hasattr(estimator, "embedding_"):
        return place_with_umap(estimator, vectors)
    return np.asarray(estimator.transform(vectors), dtype=np.float32)


def distances_to(fitted: np.ndarray, metric: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function giving the distances (float32) from rows of vectors to every fitted row.

    Euclidean, the default, is measured here in float64 as |a|^2 + |b|^2 - 2ab, as
    scikit-learn measures float32 vectors, with the fitted rows' float64 copy and norms
    made once: importing scikit-learn's pairwise_distances for it took 1.6-1.8 s of every
    assign run. The other metrics use pairwise_distances.
    """
    if metric != "euclidean":
        from sklearn.metrics import pairwise_distances

        return lambda block: pairwise_distances(block, fitted, metric=metric)
    wide = np.asarray(fitted, dtype=np.float64)
    norms = np.einsum("ij,ij->i", wide, wide)

    def euclidean(block: np.ndarray) -> np.ndarray:
        rows = np.asarray(block, dtype=np.float64)
        squared = rows @ wide.T
        squared *= -2.0
        squared += np.einsum("ij,ij->i", rows, rows)[:, None]
        squared += norms[None, :]
        np.maximum(squared, 0.0, out=squared)
        return np.sqrt(squared.astype(np.float32))

    return euclidean


def place_with_umap(reducer: Any, vectors: np.ndarray) -> np.ndarray:
    """Where a fitted UMAP puts new vectors, each on its own.

    UMAP's own transform is not used: it optimises a batch of new points together, with
    random draws shared across the batch and a number of epochs that depends on its size,
    so an image's place would depend on the images it arrived with. Here each vector goes
    where that transform starts it: the mean of its n_neighbors nearest fitted points'
    places (exact neighbours), weighted by UMAP's membership strengths; a vector equal to
    a fitted one takes its place.
    """
    count = reducer._n_neighbors
    fitted, places = reducer._raw_data, reducer.embedding_
    connectivity = max(0.0, float(reducer.local_connectivity) - 1.0)  # as UMAP's transform
    result = np.empty((len(vectors), places.shape[1]), dtype=np.float32)
    measure = distances_to(fitted, reducer.metric)
    for start in range(0, len(vectors), PLACE_BLOCK):
        block = vectors[start : start + PLACE_BLOCK]
        distances = measure(block)
        nearest = np.argpartition(distances, count - 1, axis=1)[:, :count]
        near = np.take_along_axis(distances, nearest, axis=1)
        # A fitted vector equal to the new one is at distance 0 exactly, whatever rounding
        # the distance formula left.
        near[np.all(fitted[nearest] == block[:, None, :], axis=2)] = 0.0
        order = np.lexsort((nearest, near), axis=1)  # by distance, then by fitted row
        nearest = np.take_along_axis(nearest, order, axis=1)
        near = np.take_along_axis(near, order, axis=1).astype(np.float32)
        sigmas, rhos = smooth_knn_dist(near, float(count), local_connectivity=connectivity)
        beyond = near - rhos[:, None]
        weights = np.exp(-beyond / np.where(sigmas > 0, sigmas, 1.0)[:, None])
        full = (beyond <= 0) | (sigmas[:, None] == 0)
        weights = np.where(full, 1.0, weights)
        mean = np.einsum("nk,nkd->nd", weights, places[nearest]) / weights.sum(axis=1)[:, None]
        first_full = np.argmax(full, axis=1)
        own = places[nearest[np.arange(len(block)), first_full]]
        result[start : start + len(block)] = np.where(full.any(axis=1)[:, None], own, mean)
    return result


SMOOTH_K_TOLERANCE = 1e-5  # as umap.umap_.smooth_knn_dist
MIN_K_DIST_SCALE = 1e-3
FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


def smooth_knn_dist(
    distances: np.ndarray, k: float, local_connectivity: float = 1.0, iterations: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's smooth_knn_dist (umap.umap_), in float32 as it computes, for every row at once.

    Returns each row's sigma (the kernel width that gives it log2(k) of membership) and rho
    (the distance to its local_connectivity-th nonzero neighbour). `distances` rows are
    sorted ascending. Written with numpy because UMAP's numba version compiles on its first
    call in every process: 3.6 s of every assign run that places a new image.
    """
    distances = np.asarray(distances, dtype=np.float32)
    rows, columns = distances.shape
    target = np.float32(np.log2(k))
    zeros = (distances <= 0).sum(axis=1)  # sorted rows: the nonzero distances come last
    nonzero = columns - zeros
    every_row = np.arange(rows)
    index = int(np.floor(local_connectivity))
    interpolation = local_connectivity - index  # a float64, as in UMAP

    def nonzero_at(position: int) -> np.ndarray:
        return distances[every_row, np.minimum(zeros + position, columns - 1)]

    if index > 0:
        connected = nonzero_at(index - 1).astype(np.float64)
        if interpolation > SMOOTH_K_TOLERANCE:
            step = nonzero_at(index) - nonzero_at(index - 1)  # float32, as in UMAP
            connected = connected + interpolation * step.astype(np.float64)
    else:
        connected = interpolation * nonzero_at(0).astype(np.float64)
    rho = np.where(
        nonzero >= local_connectivity, connected, np.where(nonzero > 0, distances[:, -1], 0)
    ).astype(np.float32)

    low = np.zeros(rows, dtype=np.float32)
    high = np.full(rows, FLOAT32_MAX, dtype=np.float32)
    middle = np.ones(rows, dtype=np.float32)
    searching = np.ones(rows, dtype=bool)
    for _ in range(iterations):
        total = np.zeros(rows, dtype=np.float32)
        for column in range(1, columns):  # summed in UMAP's order, for its rounding
            beyond = distances[:, column] - rho
            with np.errstate(over="ignore"):
                kernel = np.exp(-(beyond / middle))
            total = (total + np.where(beyond > 0, kernel, np.float32(1.0))).astype(np.float32)
        searching &= np.abs(total - target) >= SMOOTH_K_TOLERANCE
        if not searching.any():
            break
        too_wide = searching & (total > target)
        too_narrow = searching & ~(total > target)
        high = np.where(too_wide, middle, high)
        low = np.where(too_narrow, middle, low)
        halfway = ((low + high) / np.float32(2.0)).astype(np.float32)
        doubled = np.where(high >= FLOAT32_MAX, middle * np.float32(2.0), halfway)
        middle = np.where(too_wide, halfway, np.where(too_narrow, doubled, middle))
    floor = np.where(
        rho > 0, MIN_K_DIST_SCALE * distances.mean(axis=1), MIN_K_DIST_SCALE * distances.mean()
    )
    sigma = np.where(middle < floor, floor, middle).astype(np.float32)
    return sigma, rho


def renumber(raw: np.ndarray, order: dict[int, int]) -> np.ndarray:
    """Map raw labels to cluster numbers; labels the order does not know become noise."""
    return np.array([order.get(int(label), common.NOISE) for label in raw], dtype=np.int32)


def size_order(raw: np.ndarray) -> dict[int, int]:
    """Raw label -> cluster number, largest cluster first (ties: smaller raw label first).

    Noise keeps -1, so numbers depend only on the grouping, not on a library's label order.
    """
    labels, counts = np.unique(raw[raw != common.NOISE], return_counts=True)
    ranked = sorted(zip(labels.tolist(), counts.tolist()), key=lambda pair: (-pair[1], pair[0]))
    order = {label: number for number, (label, _) in enumerate(ranked)}
    order[common.NOISE] = common.NOISE
    return order


def import_umap() -> Any:
    """The umap package, loaded without TensorFlow.

    umap's package imports TensorFlow for ParametricUMAP, which is never used here: that
    costs seconds and TensorFlow's start-up log lines in every cluster fit. Marking
    the submodule absent makes umap skip it, as it does where TensorFlow is not installed.
    Imported here, not at the top: numba is slow to load and only UMAP needs it.
    """
    if "umap" not in sys.modules:
        sys.modules.setdefault("umap.parametric_umap", None)  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Tensorflow not installed", category=ImportWarning
        )
        import umap
    return umap


def write_model(model: ClusterModel, path: Path) -> None:
    """Pickle the fitted model with joblib, atomically."""
    with common.atomic_output(path) as temporary:
        joblib.dump(model, temporary, compress=3)


def load_model(path: Path = common.CLUSTER_MODEL_FILE) -> ClusterModel:
    """The fitted ClusterModel that the cluster stage saved."""
    if not path.exists():
        raise common.UserError(f"{path} is missing: run `dvc repro cluster` first")
    try:
        model = joblib.load(path)
    except Exception as error:  # unpickling fails in many ways: another version's file, damage
        raise common.UserError(
            f"cannot load {path} ({type(error).__name__}: {error}); it was saved by another "
            "version of this project or is damaged: fit it again with `dvc repro cluster` "
            "(after `dvc unfreeze cluster` if it is frozen)"
        ) from None
    if not isinstance(model, ClusterModel):
        raise common.UserError(f"{path} holds no cluster model: run `dvc repro cluster`")
    return model
