"""Benchmark of the cluster and score stages on a large synthetic latent space.

Makes N latent vectors of 288 values (the ISS latent) around 50 centers, then runs the
cluster stage's fit_clusters (n2d: UMAP to 2-D, KMeans, fit on a sample), the assign
stage's place (the rest through the model) and the score stage's silhouettes against a
sample, printing seconds, images
per second of the assignment, the agreement with the true centers (ARI) and the peak
memory (resident set) of the process.

Usage: python bench/cluster.py [--images N] [--fit-sample S] [--silhouette-sample R]
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import assign, cluster, common, silhouettes  # noqa: E402, I001
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

DIMENSION = 288
CENTERS = 50


def synthetic_latents(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` vectors around 50 random centers (float32), and the center of each."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (CENTERS, DIMENSION)).astype(np.float32) * 3
    truth = rng.integers(0, CENTERS, count)
    vectors = centers[truth] + rng.normal(0, 1, (count, DIMENSION)).astype(np.float32)
    return vectors, truth


def peak_memory_mib() -> float:
    """The process's peak resident set so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    """Time the fit, the assignment of the rest, and the silhouettes; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--fit-sample", type=int, default=20_000)
    parser.add_argument("--silhouette-sample", type=int, default=20_000)
    arguments = parser.parse_args()

    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["cluster"].update(
        {"method": "n2d", "n_clusters": CENTERS, "fit_sample": arguments.fit_sample}
    )
    params["cluster"]["umap"]["n_components"] = 2
    settings = cluster.ClusterParams.from_params(params)
    vectors, truth = synthetic_latents(arguments.images)
    print(f"{arguments.images} vectors of {DIMENSION} values, {CENTERS} centers")

    # UMAP compiles on its first call in a process: a tiny fit first, so that the timed
    # figures are the work itself (the stage pays the compile once per run).
    started = time.perf_counter()
    warm = copy.deepcopy(params)
    warm["cluster"].update({"fit_sample": 500, "n_clusters": 5})
    names = [str(row) for row in range(len(vectors))]
    warm_fit = cluster.fit_clusters(
        vectors[:500], names[:500], cluster.ClusterParams.from_params(warm)
    )
    assign.place(warm_fit.model, vectors[500:1000], names[500:1000])
    print(f"UMAP compile and warm-up: {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    rows = common.sample_rows(len(vectors), settings.fit_sample, settings.random_state)
    fit = cluster.fit_clusters(vectors[rows], [names[row] for row in rows], settings)
    fitted = time.perf_counter()
    clusters, _, in_fit = assign.place(fit.model, vectors, names)
    placed = time.perf_counter()
    rest = len(vectors) - len(rows)
    print(
        f"cluster: fit on {len(rows)} in {fitted - started:.1f} s; assign: {len(vectors)} "
        f"placed in {placed - fitted:.1f} s ({rest} through the model, "
        f"{rest / (placed - fitted):,.0f} images/s); ARI with the true centers "
        f"{adjusted_rand_score(truth, clusters):.3f}"
    )

    started = time.perf_counter()
    reference = silhouettes.reference_rows(clusters, in_fit, names, arguments.silhouette_sample, 0)
    per_image = silhouettes.silhouette_per_image(vectors, clusters, reference)
    seconds = time.perf_counter() - started
    print(
        f"score: silhouettes of {arguments.images} images against "
        f"{len(reference)} of the fit sample in {seconds:.1f} s "
        f"({arguments.images / seconds:,.0f} images/s), mean {np.nanmean(per_image):.3f}"
    )
    print(f"peak memory: {peak_memory_mib():,.0f} MiB (vectors: {vectors.nbytes / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
