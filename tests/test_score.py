"""score: silhouettes (exact and sampled), label agreement, metrics, mosaics, outliers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from sklearn.datasets import make_blobs
from sklearn.metrics import silhouette_samples

from stages import common, embed, score, silhouettes, thumbnails

THUMBS_PART = thumbnails.THUMBS_DIR / "part-00000.parquet"  # one part: a small collection


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """300 points in 8 dimensions around 3 centers, with some overlap."""
    vectors, truth = make_blobs(
        n_samples=300, centers=3, n_features=8, cluster_std=2.5, random_state=7
    )
    return vectors.astype(np.float32), truth


def shas(count: int) -> list[str]:
    """Distinct stand-ins for file sha256s."""
    return [f"file-{row}" for row in range(count)]


def reference_silhouettes(
    vectors: np.ndarray, clusters: np.ndarray, size: int = 10000, seed: int = 0
):
    """Silhouettes against a reference of every clustered image (at most `size`)."""
    nothing_fitted = np.zeros(len(clusters), dtype=bool)
    reference = silhouettes.reference_rows(
        clusters, nothing_fitted, shas(len(clusters)), size, seed
    )
    return silhouettes.silhouette_per_image(vectors, clusters, reference)


def test_silhouette_equals_scikit_learn_when_exact(blobs) -> None:
    vectors, truth = blobs
    ours = reference_silhouettes(vectors, truth)
    np.testing.assert_allclose(ours, silhouette_samples(vectors, truth), atol=1e-5)


def test_sampled_silhouette_is_close_and_seeded(blobs) -> None:
    vectors, truth = blobs
    exact = silhouette_samples(vectors, truth)
    sampled = reference_silhouettes(vectors, truth, size=120, seed=1)
    again = reference_silhouettes(vectors, truth, size=120, seed=1)
    other = reference_silhouettes(vectors, truth, size=120, seed=2)
    np.testing.assert_array_equal(sampled, again)
    assert not np.array_equal(sampled, other)
    assert np.isfinite(sampled).all()
    assert abs(sampled.mean() - exact.mean()) < 0.02
    assert np.abs(sampled - exact).max() < 0.15


def test_the_reference_is_the_fit_sample_chosen_by_content(blobs) -> None:
    _, truth = blobs
    clusters = truth.copy()
    clusters[:5] = common.NOISE
    fitted = np.zeros(300, dtype=bool)
    fitted[::2] = True
    reference = silhouettes.reference_rows(clusters, fitted, shas(300), 10000, 0)
    np.testing.assert_array_equal(reference, np.arange(6, 300, 2))  # clustered, fitted
    some = silhouettes.reference_rows(clusters, fitted, shas(300), 50, 0)
    assert len(some) == 50 and set(some) <= set(reference)
    # The same files in another order, with others added: the same files are chosen.
    order = np.random.default_rng(3).permutation(300)
    grown = silhouettes.reference_rows(
        np.append(clusters[order], [0] * 40),
        np.append(fitted[order], [False] * 40),
        [shas(300)[row] for row in order] + [f"new-{row}" for row in range(40)],
        50,
        0,
    )
    assert sorted(order[grown]) == sorted(some)


def test_a_silhouette_depends_on_its_image_and_the_reference_alone(blobs) -> None:
    vectors, truth = blobs
    reference = np.arange(0, 300, 3)
    whole = silhouettes.silhouette_per_image(vectors, truth, reference)
    rows = np.array([299, 4, 3, 150])
    np.testing.assert_array_equal(
        silhouettes.silhouette_per_image(vectors, truth, reference, rows), whole[rows]
    )


def test_noise_and_single_image_clusters(blobs) -> None:
    vectors, truth = blobs
    clusters = truth.copy()
    clusters[:10] = common.NOISE
    clusters[10] = 7  # a cluster of one image
    ours = reference_silhouettes(vectors, clusters)
    assert np.isnan(ours[:10]).all()
    assert ours[10] == 0.0
    kept = clusters != common.NOISE
    np.testing.assert_allclose(
        ours[kept], silhouette_samples(vectors[kept], clusters[kept]), atol=1e-5
    )
    one_cluster = reference_silhouettes(vectors, np.zeros(300, int))
    assert np.isnan(one_cluster).all()


def test_center_distances_across_blocks_and_for_noise(blobs, monkeypatch) -> None:
    vectors, truth = blobs
    clusters = truth.copy()
    clusters[::7] = common.NOISE
    monkeypatch.setattr(score, "DISTANCE_BLOCK", 64)  # several blocks, some noise in each
    centers = score.cluster_centers(vectors, clusters)
    distances = score.center_distances(vectors, clusters, centers)
    matrix = np.stack([centers[number] for number in sorted(centers)])
    everyone = np.linalg.norm(vectors[:, None, :].astype(np.float64) - matrix[None], axis=2)
    expected = np.where(
        clusters == common.NOISE,
        everyone.min(axis=1),
        everyone[np.arange(len(vectors)), np.maximum(clusters, 0)],
    )
    np.testing.assert_allclose(distances, expected, rtol=1e-12)
    assert (distances[clusters == common.NOISE] <= everyone[clusters == common.NOISE].T).all()


def test_centers_come_from_the_reference_so_new_images_leave_them_still(blobs) -> None:
    vectors, truth = blobs
    clusters = truth.astype(np.int32)
    reference = np.arange(0, len(vectors), 2)
    centers = score.reference_centers(vectors, clusters, reference)
    for cluster, center in centers.items():
        members = reference[clusters[reference] == cluster]
        np.testing.assert_allclose(center, vectors[members].mean(axis=0))
    grown = np.vstack([vectors, vectors[:5] + 3.0])  # new images, outside the reference
    grown_clusters = np.concatenate([clusters, clusters[:5]])
    again = score.reference_centers(grown, grown_clusters, reference)
    assert all(np.array_equal(again[c], centers[c]) for c in centers)
    # A cluster with no image in the reference is centred on all its images.
    lonely = np.concatenate([clusters, [7, 7]])
    extra = np.vstack([vectors, [[1.0] * vectors.shape[1], [3.0] * vectors.shape[1]]])
    np.testing.assert_allclose(score.reference_centers(extra, lonely, reference)[7], 2.0)


def test_dispersion_scores_equal_scikit_learn_across_blocks(blobs, monkeypatch) -> None:
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

    vectors, truth = blobs
    clusters = truth.copy()
    clusters[::11] = common.NOISE
    kept = clusters != common.NOISE
    monkeypatch.setattr(score, "DISTANCE_BLOCK", 64)  # several blocks
    calinski_harabasz, davies_bouldin = score.dispersion_scores(vectors, clusters, kept)
    assert calinski_harabasz == pytest.approx(
        calinski_harabasz_score(vectors[kept], clusters[kept]), rel=1e-9
    )
    # scikit-learn measures Davies-Bouldin's distances in float32
    assert davies_bouldin == pytest.approx(
        davies_bouldin_score(vectors[kept], clusters[kept]), rel=1e-5
    )
    same_point = np.zeros_like(vectors)
    assert score.dispersion_scores(same_point, clusters, kept) == (1.0, 0.0)


def test_hungarian_accuracy_matches_clusters_to_labels() -> None:
    truth = np.array(["a", "a", "a", "b", "b", "c", "c", "c"])
    renamed = np.array([2, 2, 2, 0, 0, 1, 1, 1])
    assert score.hungarian_accuracy(truth, renamed) == 1.0
    one_wrong = np.array([2, 2, 0, 0, 0, 1, 1, 1])
    assert score.hungarian_accuracy(truth, one_wrong) == 7 / 8
    merged = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    assert score.hungarian_accuracy(truth, merged) == 6 / 8
    noise = np.array([-1, -1, -1, 0, 0, 1, 1, 1])
    assert score.hungarian_accuracy(truth, noise) == 5 / 8


def test_metrics_are_flat_and_agree_with_labels(blobs) -> None:
    vectors, truth = blobs
    per_image = reference_silhouettes(vectors, truth)
    per_cluster = score.silhouette_table(truth, per_image)
    labels = pd.Series([f"digit {value}" for value in truth])
    metrics = score.cluster_metrics(vectors, truth, per_image, per_cluster, labels)
    assert metrics["accuracy"] == metrics["ari"] == metrics["nmi"] == 1.0
    assert metrics["n_clusters"] == 3
    assert metrics["size_min"] + metrics["size_max"] + metrics["size_median"] == 300
    assert metrics["silhouette"] == pytest.approx(silhouette_samples(vectors, truth).mean(), 1e-5)
    assert metrics["calinski_harabasz"] > 0 and metrics["davies_bouldin"] > 0
    assert all(not isinstance(value, dict | list) for value in metrics.values())


def test_without_labels_there_is_no_agreement_metric(blobs) -> None:
    vectors, truth = blobs
    per_image = reference_silhouettes(vectors, truth)
    per_cluster = score.silhouette_table(truth, per_image)
    unlabelled = pd.Series([None] * len(truth), dtype=object)
    metrics = score.cluster_metrics(vectors, truth, per_image, per_cluster, unlabelled)
    assert "accuracy" not in metrics and "ari" not in metrics


def test_noise_share_and_undefined_scores_with_one_cluster(blobs) -> None:
    vectors, _ = blobs
    clusters = np.zeros(300, dtype=int)
    clusters[:30] = common.NOISE
    per_image = reference_silhouettes(vectors, clusters)
    per_cluster = score.silhouette_table(clusters, per_image)
    metrics = score.cluster_metrics(
        vectors, clusters, per_image, per_cluster, pd.Series([None] * 300)
    )
    assert metrics["noise_share"] == 0.1
    assert metrics["n_clusters"] == 1
    assert metrics["silhouette"] is None and metrics["davies_bouldin"] is None


def test_outliers_are_noise_then_the_lowest_silhouettes() -> None:
    scores = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e"],
            "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
            "cluster": [0, -1, 1, -1, 0],
            "silhouette": [0.5, np.nan, -0.2, np.nan, 0.1],
            "center_distance": [1.0, 3.0, 2.0, 9.0, 1.5],
        }
    )
    table = score.outlier_table(scores, count=2)
    assert table["id"].tolist() == ["d", "b", "c", "e"]
    assert table["reason"].tolist() == ["noise", "noise", "low silhouette", "low silhouette"]


def test_central_rows_put_the_nearest_images_first() -> None:
    clusters = np.array([0, 0, 1, 0, -1, 1])
    distances = np.array([3.0, 1.0, 2.0, 2.0, 0.0, 0.5])
    ids = ["a", "b", "c", "d", "e", "f"]
    rows = score.central_rows(clusters, distances, ids)
    assert rows[0].tolist() == [1, 3, 0]
    assert rows[1].tolist() == [5, 2]
    assert -1 not in rows


def test_central_rows_break_ties_by_id_and_list_every_image_once() -> None:
    rng = np.random.default_rng(4)
    clusters = rng.integers(-1, 6, 500)
    distances = rng.integers(0, 5, 500).astype(float)  # many ties
    ids = [f"img-{value:04d}" for value in rng.permutation(500)]
    copies = rng.random(500) < 0.1
    rows = score.central_rows(clusters, distances, ids, copies)
    assert sorted(rows) == sorted(set(clusters[~copies].tolist()) - {-1})
    for cluster, held in rows.items():
        expected = sorted(
            np.flatnonzero((clusters == cluster) & ~copies), key=lambda r: (distances[r], ids[r])
        )
        assert held.tolist() == expected


def test_mosaics_leave_near_duplicate_copies_out() -> None:
    clusters = np.array([0, 0, 0, 0])
    copies = np.array([False, True, False, False])  # row 1 is a copy of another image
    rows = score.central_rows(clusters, np.array([0.5, 0.1, 0.2, 0.3]), list("abcd"), copies)
    assert rows[0].tolist() == [2, 3, 0]


def test_mosaics_show_each_cluster_in_a_grid(tmp_path: Path) -> None:
    thumbs = np.stack([np.full((6, 10, 3), value, dtype=np.uint8) for value in range(30)])
    clusters = np.array([0] * 25 + [1] * 5)
    rows = score.central_rows(clusters, np.arange(30.0), [str(i) for i in range(30)])
    per_cluster = pd.DataFrame({"cluster": [0, 1], "size": [25, 5], "silhouette": [0.4, 0.2]})
    folder = tmp_path / "mosaics"
    folder.mkdir()
    (folder / "cluster-099.png").write_bytes(b"from an older run")
    score.write_mosaics(thumbs, rows, per_cluster, side=4, directory=folder)
    assert sorted(path.name for path in folder.iterdir()) == [
        "cluster-000.png",
        "cluster-001.png",
        "overview.png",
    ]
    full = np.asarray(Image.open(folder / "cluster-000.png"))
    assert full.shape == (4 * 8 + 2, 4 * 12 + 2, 3)  # 4x4 of 16 shown, not 25
    assert full[2, 2, 0] == 0 and full[2, 2 + 12, 0] == 1  # nearest the center first
    small = np.asarray(Image.open(folder / "cluster-001.png"))
    assert small.shape == (2 * 8 + 2, 4 * 12 + 2, 3)


@pytest.fixture
def score_project(tmp_path: Path, monkeypatch, project_params: dict[str, Any]) -> Path:
    """A project folder with every input of score: 3 labelled blobs of 90 images."""
    vectors, truth = make_blobs(n_samples=90, centers=3, n_features=6, random_state=2)
    ids = [f"image-{row:03d}" for row in range(90)]
    monkeypatch.chdir(tmp_path)
    params = copy.deepcopy(project_params)
    params["score"]["outliers"] = 5
    Path("params.yaml").write_text(yaml.safe_dump(params))
    codes = vectors.astype(np.float32)
    common.EMBEDDINGS_DIR.parent.mkdir(parents=True)
    pq.write_table(embed.embeddings_table(ids, codes), common.EMBEDDINGS_DIR)
    clusters = pd.DataFrame({"id": ids, "cluster": truth, "x": vectors[:, 0], "y": vectors[:, 1]})
    clusters["fitted"] = np.arange(90) % 3 > 0  # a fit sample of 60
    common.write_parquet(clusters, common.CLUSTERS_FILE, keys={"assign_key": "model-embeddings"})
    manifest = pd.DataFrame(
        {"id": ids, "path": [f"{i}.png" for i in ids], "label": [str(t) for t in truth]}
    )
    common.write_parquet(manifest, common.MANIFEST_FILE)
    thumbs = np.random.default_rng(0).integers(0, 255, (90, 9, 16, 3), dtype=np.uint8)
    common.INTERIM_DIR.mkdir(parents=True)
    encoded = [thumbnails.encode(thumb) for thumb in thumbs]
    thumbnails.write_table(THUMBS_PART, ids, [encoded], 9, 16)
    sha256s = [f"sha-{row:03d}" for row in range(90)]
    common.write_parquet(pd.DataFrame({"id": ids, "sha256": sha256s}), common.ARRAY_IDS_FILE)
    near = pd.DataFrame({"id": ids, "near_group": 0, "near_of": None, "near_size": 1})
    common.write_parquet(near, common.NEAR_GROUPS_FILE)
    return tmp_path


def test_stage_writes_every_output(score_project: Path) -> None:
    score.main()
    metrics = json.loads(score.CLUSTER_METRICS_FILE.read_text())
    assert metrics["accuracy"] == 1.0 and metrics["n_clusters"] == 3
    table = pd.read_csv(score.SILHOUETTE_FILE)
    assert table.columns.tolist() == ["cluster", "size", "silhouette"]
    assert table["size"].sum() == 90
    scores = pd.read_parquet(common.SCORES_FILE)
    assert scores.columns.tolist() == ["id", "cluster", "silhouette", "center_distance"]
    outliers = pd.read_csv(score.OUTLIERS_FILE)
    assert len(outliers) == 5 and set(outliers["reason"]) == {"low silhouette"}
    assert outliers["silhouette"].is_monotonic_increasing
    assert outliers["path"].str.endswith(".png").all()
    assert len(list(score.MOSAICS_DIR.glob("cluster-*.png"))) == 3
    assert Image.open(score.OUTLIERS_MOSAIC_FILE).size[0] > 0


def test_a_second_run_takes_every_silhouette_from_the_cache(score_project: Path, logged) -> None:
    score.main()
    first = common.SCORES_FILE.read_bytes()
    cached = [path for path in (common.CACHE_DIR / "score").rglob("*.npy")]
    assert len(cached) == 1
    logged.clear()
    score.main()
    assert "(0 silhouettes computed against 60 reference images" in logged.text
    assert common.SCORES_FILE.read_bytes() == first
    # Another placement of the images is another cache: everything is computed again.
    table = pd.read_parquet(common.CLUSTERS_FILE)
    common.write_parquet(table, common.CLUSTERS_FILE, keys={"assign_key": "another-model"})
    logged.clear()
    score.main()
    assert "(90 silhouettes computed against 60 reference images" in logged.text
    assert common.SCORES_FILE.read_bytes() == first


def test_a_second_run_copies_the_mosaics_it_drew_before(score_project: Path, logged) -> None:
    ids = pd.read_parquet(common.ARRAY_IDS_FILE)["id"].tolist()
    stored = thumbnails.Thumbnails(thumbnails.THUMBS_DIR)
    jpegs = [stored.jpeg(row) for row in range(len(stored))]
    thumbnails.write_table(THUMBS_PART, ids, [jpegs], 9, 16, key="thumbs-key")
    score.main()
    assert "0 of 3 cluster mosaics kept from the last run" in logged.text
    drawn = {path.name: path.read_bytes() for path in score.MOSAICS_DIR.iterdir()}
    (score.MOSAIC_CACHE_DIR / "stale.png").write_bytes(b"from an older run")
    logged.clear()
    score.main()
    assert "3 of 3 cluster mosaics kept from the last run" in logged.text
    assert {path.name: path.read_bytes() for path in score.MOSAICS_DIR.iterdir()} == drawn
    assert len(list(score.MOSAIC_CACHE_DIR.iterdir())) == 3, "only this run's mosaics stay"
    # Other thumbnails (another key) draw every mosaic again.
    thumbnails.write_table(THUMBS_PART, ids, [jpegs], 9, 16, key="other-key")
    logged.clear()
    score.main()
    assert "0 of 3 cluster mosaics kept from the last run" in logged.text


def test_stage_refuses_clusters_of_other_images(score_project: Path) -> None:
    table = pd.read_parquet(common.CLUSTERS_FILE)
    common.write_parquet(table.iloc[1:], common.CLUSTERS_FILE)
    with pytest.raises(common.UserError, match="does not match"):
        score.main()


@pytest.mark.parametrize(
    ("key", "value"),
    [("silhouette_sample", 1), ("mosaic_side", 0), ("outliers", -1), ("seed", "x")],
)
def test_bad_params_name_the_key(project_params, key: str, value: Any) -> None:
    params = copy.deepcopy(project_params)
    params["score"][key] = value
    with pytest.raises(common.UserError, match=f"score.{key} = "):
        score.ScoreParams.from_params(params)
