"""cluster and assign: each method recovers well-separated blobs; auto k; the saved model;
placing images with it, through the cache; errors.

UMAP compiles for tens of seconds on its first call in a process, so the fits that need
it are made once per session in fixtures and shared by the tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import in_fresh_process
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from stages import assign, cluster, cluster_model, common
from stages.content_cache import ContentCache

BLOB_COUNT = 4


@pytest.fixture(scope="session")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """240 points in 16 dimensions around 4 far-apart centers, and their true blob."""
    vectors, truth = make_blobs(
        n_samples=240, centers=BLOB_COUNT, n_features=16, cluster_std=0.6, random_state=3
    )
    return vectors.astype(np.float32), truth


def blob_params(project_params: dict[str, Any], **changes: Any) -> cluster.ClusterParams:
    """The committed cluster params with small-data settings and `changes` applied."""
    params = copy.deepcopy(project_params)
    section = params["cluster"]
    section.update({"n_clusters": BLOB_COUNT, "fit_sample": 100000})
    section["umap"].update({"n_neighbors": 10, "n_components": 2})
    section["classical"].update({"pca_components": 8, "kmeans_clusters": 20})
    section["hdbscan"].update({"min_cluster_size": 10, "min_samples": None})
    for key, value in changes.items():
        target = section
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return cluster.ClusterParams.from_params(params)


def names(count: int) -> list[str]:
    """Stand-in sha256s, one per image."""
    return [f"sha-{row:04d}" for row in range(count)]


@dataclass
class Placed:
    """A fit on the sample of the params, and every image placed with it, as the cluster
    and assign stages do."""

    model: cluster_model.ClusterModel
    curve: pd.DataFrame
    clusters: np.ndarray
    coordinates: np.ndarray


def fit_and_place(vectors: np.ndarray, params: cluster.ClusterParams) -> Placed:
    """Fit on the seeded sample, then place every image."""
    rows = common.sample_rows(len(vectors), params.fit_sample, params.random_state)
    fit = cluster.fit_clusters(vectors[rows], [names(len(vectors))[row] for row in rows], params)
    clusters, coordinates, fitted = assign.place(fit.model, vectors, names(len(vectors)))
    np.testing.assert_array_equal(np.flatnonzero(fitted), rows)
    return Placed(fit.model, fit.curve, clusters, coordinates)


@pytest.fixture(scope="session")
def fits(blobs, project_params) -> dict[str, Placed]:
    """One fit per method and setting, shared (UMAP compiles once per process)."""
    vectors, _ = blobs
    settings = {
        "n2d": {},
        "n2d_gmm": {"assign": "gmm"},
        "n2d_10d": {"umap.n_components": 5},
        "classical": {"method": "classical"},
        "hdbscan": {"method": "hdbscan"},
        "n2d_auto": {"n_clusters": "auto", "auto.max": 8},
        "classical_auto": {"method": "classical", "n_clusters": "auto", "auto.max": 8},
        "n2d_sample": {"fit_sample": 120},
        "n2d_again": {},
    }
    return {
        name: fit_and_place(vectors, blob_params(project_params, **changes))
        for name, changes in settings.items()
    }


@pytest.mark.parametrize(
    "name", ["n2d", "n2d_gmm", "n2d_10d", "classical", "hdbscan", "n2d_sample"]
)
def test_each_method_recovers_the_blobs(fits, blobs, name: str) -> None:
    _, truth = blobs
    found = fits[name].clusters
    assert adjusted_rand_score(truth, found) == 1.0
    assert sorted(np.unique(found)) == list(range(BLOB_COUNT))


def test_clusters_are_numbered_by_size_largest_first(project_params) -> None:
    vectors, truth = make_blobs(
        n_samples=[90, 30, 60], n_features=5, cluster_std=0.3, random_state=1, center_box=(-50, 50)
    )
    params = blob_params(project_params, method="classical", n_clusters=3)
    found = fit_and_place(vectors.astype(np.float32), params).clusters
    assert np.bincount(found).tolist() == [90, 60, 30]
    assert adjusted_rand_score(truth, found) == 1.0


@pytest.mark.parametrize("name", ["n2d_auto", "classical_auto"])
def test_auto_picks_the_number_of_blobs(fits, name: str) -> None:
    fit = fits[name]
    assert len(np.unique(fit.clusters)) == BLOB_COUNT
    assert fit.curve["k"].tolist() == list(range(2, 9))
    best = fit.curve.loc[fit.curve["score"].idxmax(), "k"]
    assert best == BLOB_COUNT


def test_davies_bouldin_is_minimised_when_choosing_k(blobs) -> None:
    vectors, truth = blobs
    noisy = np.random.default_rng(0).integers(0, 3, len(vectors))
    candidates = {2: noisy, 4: truth, 6: noisy}
    k, curve = cluster.choose_k([2, 4, 6], candidates.__getitem__, vectors, "davies_bouldin", 0)
    assert k == 4
    assert curve.loc[curve["k"] == 4, "score"].item() == curve["score"].min()


def test_identical_runs_give_identical_labels_and_maps(fits) -> None:
    np.testing.assert_array_equal(fits["n2d"].clusters, fits["n2d_again"].clusters)
    np.testing.assert_array_equal(fits["n2d"].coordinates, fits["n2d_again"].coordinates)


def test_a_fit_in_another_process_writes_the_same_model_file(
    fits, blobs, project_params, tmp_path: Path
) -> None:
    # Numba gives compiled functions new ids in every process; none may reach the file,
    # or a forced `dvc repro cluster` would change the model and rerun score.
    vectors, _ = blobs
    cluster_model.write_model(fits["n2d_10d"].model, tmp_path / "here.joblib")  # reducer and mapper
    code = """
from pathlib import Path
from stages import cluster, cluster_model
shas = [f"sha-{row:04d}" for row in range(len(inputs["vectors"]))]
fit = cluster.fit_clusters(inputs["vectors"], shas, inputs["params"])
cluster_model.write_model(fit.model, Path("there.joblib"))
"""
    params = blob_params(project_params, **{"umap.n_components": 5})
    in_fresh_process({"vectors": vectors, "params": params}, code, tmp_path)
    assert (tmp_path / "here.joblib").read_bytes() == (tmp_path / "there.joblib").read_bytes()


@pytest.mark.parametrize("name", ["n2d", "n2d_gmm", "n2d_10d", "classical", "hdbscan"])
def test_saved_model_assigns_the_fitted_images_their_clusters(
    fits, blobs, name: str, tmp_path: Path
) -> None:
    vectors, _ = blobs
    cluster_model.write_model(fits[name].model, tmp_path / "cluster.joblib")
    model = cluster_model.load_model(tmp_path / "cluster.joblib")
    np.testing.assert_array_equal(model.predict(vectors), fits[name].clusters)
    assert model.map_coordinates(vectors[:5]).shape == (5, 2)
    assert model.fitted.sha256.tolist() == names(len(vectors)), "the fit keeps its placements"


def test_the_rest_of_a_sample_fit_is_assigned_with_the_model(fits, blobs) -> None:
    vectors, truth = blobs
    fit = fits["n2d_sample"]
    rows = common.sample_rows(len(vectors), 120, 42)
    rest = np.setdiff1d(np.arange(len(vectors)), rows)
    assert len(rest) == 120
    assert adjusted_rand_score(truth[rest], fit.clusters[rest]) == 1.0
    assert np.isfinite(fit.coordinates).all()
    # The sample keeps the fit's own places; the rest go through the model's transform.
    np.testing.assert_array_equal(fit.coordinates[rows], fit.model.fitted.xy)
    clusters, coordinates = fit.model.predict_with_map(vectors[rest])
    np.testing.assert_array_equal(fit.clusters[rest], clusters)
    np.testing.assert_array_equal(fit.coordinates[rest], coordinates)


def test_new_vectors_near_a_blob_join_its_cluster(fits, blobs) -> None:
    vectors, _ = blobs
    jitter = np.random.default_rng(5).normal(0, 0.05, vectors[:20].shape).astype(np.float32)
    for name in ("n2d", "classical", "hdbscan"):
        fit = fits[name]
        predicted = fit.model.predict(vectors[:20] + jitter)
        np.testing.assert_array_equal(predicted, fit.clusters[:20])


def write_embeddings(vectors: np.ndarray, path: Path) -> None:
    """An embeddings table as embed writes it, in row groups of 64."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    table = pa.table({"id": [f"image-{row}" for row in range(len(vectors))], "embedding": values})
    pq.write_table(table, path, row_group_size=64)


@pytest.mark.parametrize("local_connectivity", [0.0, 0.6, 1.0, 2.5])
def test_smooth_knn_dist_agrees_with_umaps(local_connectivity: float) -> None:
    from umap.umap_ import smooth_knn_dist

    rng = np.random.default_rng(3)
    distances = np.sort(rng.gamma(2.0, 1.0, (400, 15)).astype(np.float32), axis=1)
    distances[:20, :4] = 0.0  # duplicates among the neighbours
    distances[20:25] = 0.0  # every neighbour a duplicate
    expected_sigma, expected_rho = smooth_knn_dist(
        distances, 15.0, local_connectivity=local_connectivity
    )
    sigma, rho = cluster_model.smooth_knn_dist(distances, 15.0, local_connectivity)
    np.testing.assert_array_equal(rho, expected_rho)
    # numpy's and numba's exp may differ by an ulp, which can stop the search a step apart
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-4)


def test_assign_places_only_what_its_cache_lacks(fits, blobs, tmp_path: Path) -> None:
    vectors, _ = blobs
    fit = fits["n2d_sample"]
    cluster_model.write_model(fit.model, tmp_path / "cluster.joblib")
    write_embeddings(vectors, tmp_path / "embeddings.parquet")
    shas = names(len(vectors))
    cache = ContentCache(tmp_path / "cache", tuple(assign.ARRAYS))

    def place(count: int) -> assign.AssignSummary:
        files = (tmp_path / "cluster.joblib", tmp_path / "embeddings.parquet")
        return assign.place_missing(*files, shas[:count], cache)

    fitted_first = int((common.sample_rows(240, 120, 42) < 200).sum())  # fit images in 0..199
    assert place(200) == assign.AssignSummary(200 - fitted_first, fitted_first, from_cache=0)
    later = assign.AssignSummary(40 - (120 - fitted_first), 120 - fitted_first, from_cache=200)
    assert place(240) == later
    assert place(240) == assign.AssignSummary(placed=0, from_fit=0, from_cache=240)
    table = assign.clusters_table([f"image-{row}" for row in range(240)], shas, cache)
    assert table.columns.tolist() == ["id", "cluster", "x", "y", "fitted"]
    np.testing.assert_array_equal(np.flatnonzero(table["fitted"]), common.sample_rows(240, 120, 42))
    np.testing.assert_array_equal(table["cluster"], fit.clusters)
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), fit.coordinates)


def test_map_and_curve_are_written(fits, tmp_path: Path) -> None:
    fit = fits["hdbscan"]
    table = pd.DataFrame({"cluster": fit.clusters, "x": fit.coordinates[:, 0]})
    table["y"] = fit.coordinates[:, 1]
    assign.write_map(table, tmp_path / "map.png", "blobs")
    assign.write_map(table, tmp_path / "again.png", "blobs")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "map.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    common.write_csv(fits["n2d_auto"].curve, tmp_path / "curve.csv")
    assert pd.read_csv(tmp_path / "curve.csv").columns.tolist() == ["k", "score"]


def test_more_clusters_than_images_is_a_clear_error(blobs, project_params) -> None:
    vectors, _ = blobs
    params = blob_params(project_params, method="classical", n_clusters=500)
    with pytest.raises(common.UserError, match=r"cluster.n_clusters = 500 .* 240 images"):
        cluster.fit_clusters(vectors, names(len(vectors)), params)


def test_too_many_neighbours_for_a_small_sample_is_a_clear_error(blobs, project_params) -> None:
    vectors, _ = blobs
    params = blob_params(project_params, fit_sample=8, n_clusters=2)
    with pytest.raises(common.UserError, match=r"cluster.umap.n_neighbors = 10 .* 8 images"):
        fit_and_place(vectors, params)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("method", "dbscan", "n2d, classical, hdbscan"),
        ("n_clusters", "many", "an integer, or auto"),
        ("n_clusters", 0, ">= 1"),
        ("assign", "spectral", "kmeans, gmm"),
        ("auto.criterion", "inertia", "silhouette"),
        ("auto.max", 1, "cluster.auto.max = 1"),
        ("umap.metric", "hamming", "cosine"),
        ("umap.min_dist", 2, "cluster.umap.min_dist = 2"),
        ("classical.linkage", "centroid", "ward"),
        ("fit_sample", 1, "cluster.fit_sample = 1"),
    ],
)
def test_bad_params_name_the_key(project_params, key: str, value: Any, words: str) -> None:
    with pytest.raises(common.UserError, match=words):
        blob_params(project_params, **{key: value})


def test_a_saved_model_keeps_what_placing_needs_and_loads_without_umap(
    project_params, tmp_path
) -> None:
    # Above 4,096 images UMAP keeps a pynndescent index with numba-compiled parts; the file
    # holds only the fitted vectors and places, so loading it imports neither.
    vectors, truth = make_blobs(
        n_samples=4200, centers=3, n_features=8, cluster_std=0.5, random_state=4
    )
    params = blob_params(project_params, n_clusters=3)
    fit = fit_and_place(vectors.astype(np.float32), params)
    state = fit.model.__getstate__()
    assert isinstance(state["reducer"], cluster_model.FittedUmap)
    assert isinstance(state["assigner"], cluster_model.FittedKMeans)
    np.testing.assert_array_equal(state["reducer"].embedding_, fit.model.reducer.embedding_)
    path = tmp_path / "cluster.joblib"
    cluster_model.write_model(fit.model, path)
    model = cluster_model.load_model(path)
    np.testing.assert_array_equal(model.predict(vectors[:300]), fit.clusters[:300])
    assert adjusted_rand_score(truth, fit.clusters) == 1.0
    code = """
import sys
from pathlib import Path
from stages import cluster_model
cluster_model.load_model(Path("cluster.joblib"))
heavy = ("umap", "numba", "pynndescent", "sklearn.cluster")
loaded = [name for name in heavy if name in sys.modules]
assert not loaded, loaded
"""
    in_fresh_process({}, code, tmp_path)


@pytest.mark.parametrize("dimensions", [2, 10])
def test_a_fitted_kmeans_labels_points_as_scikit_learn_does(dimensions: int) -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(dimensions)
    points = rng.normal(size=(2000, dimensions)).astype(np.float32)
    kmeans = KMeans(n_clusters=50, n_init=1, random_state=0).fit(points)
    fitted = cluster_model.FittedKMeans.of(kmeans)
    assert isinstance(fitted, cluster_model.FittedKMeans)
    new = rng.normal(size=(50_000, dimensions)).astype(np.float32)
    np.testing.assert_array_equal(fitted.predict(new), kmeans.predict(new))
    assert cluster_model.FittedKMeans.of(None) is None, "other assigners stay as they are"


def test_a_model_file_that_cannot_be_loaded_names_the_fix(tmp_path) -> None:
    path = tmp_path / "cluster.joblib"
    path.write_bytes(b"not a pickle")
    with pytest.raises(common.UserError, match=r"cluster.joblib .*dvc repro cluster"):
        cluster_model.load_model(path)


def test_placing_measures_euclidean_distances_as_scikit_learn_does() -> None:
    from sklearn.metrics import pairwise_distances

    rng = np.random.default_rng(7)
    fitted = (rng.random((700, 24)) * 3).astype(np.float32)
    block = (rng.random((50, 24)) * 3).astype(np.float32)
    block[:5] = fitted[:5]  # equal vectors: near 0 (place_with_umap then sets 0 exactly)
    measured = cluster_model.distances_to(fitted, "euclidean")(block)
    assert measured.dtype == np.float32
    np.testing.assert_allclose(measured, pairwise_distances(block, fitted), rtol=1e-6, atol=1e-6)
    assert (measured[np.arange(5), np.arange(5)] < 1e-3).all()
    cosine = cluster_model.distances_to(fitted, "cosine")(block)
    np.testing.assert_allclose(cosine, pairwise_distances(block, fitted, metric="cosine"))
