"""How far the demo's labels are from what its data clusters into: figures behind the
demo's accuracy (README, "On the demo").

Run after `dvc repro` on the demo; it reads the workspace's embeddings, pixels, manifest
(labels) and the cluster params. For the pipeline's latent and for the raw pixels (at the
digits' own 8x8 size), it fits the cluster stage's UMAP and prints:

- the cluster stage's assignment into as many clusters as there are labels: accuracy,
  ARI and NMI against the labels, and the clusters that mix two labels;
- silhouette, Calinski-Harabasz and Davies-Bouldin of that clustering and of the labels
  themselves, in the UMAP space and in the feature space. Where the labels score worse,
  a method that looks for well-separated groups prefers the clustering to the labels;
- with one cluster more than there are labels: each group that holds a minority of its
  label (on the demo, the 1s drawn with a base) and the weight of its UMAP-graph edges
  to the rest of that label and to the other labels, and the purity of that clustering
  (the accuracy if every extra group joined its own label).

Usage: python bench/demo_structure.py [--seed N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import cluster, common, parts, score, settings  # noqa: E402, I001
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn import metrics  # noqa: E402

DIGIT_SIDE = 8  # the demo's digits are 8x8 images enlarged by repeating pixels


def labelled_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labels, the pipeline's latent vectors and the raw pixels (gray, 8x8), in one order."""
    ids, latent = common.read_embeddings()
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync").set_index("id")
    labels = manifest["label"].reindex(ids)
    if labels.isna().any():
        raise SystemExit("this needs a labelled collection: run `dvc repro` on the demo")
    pixel_ids, pixels = parts.load_pixels()
    if pixel_ids != ids:
        raise SystemExit("pixels and embeddings are out of step: run `dvc repro`")
    step = max(1, pixels.shape[1] // DIGIT_SIDE)
    gray = pixels[:, ::step, ::step, 0].reshape(len(pixels), -1).astype(np.float32) / 255.0
    return labels.astype(str).to_numpy(), latent, gray


def separation(points: np.ndarray, grouping: np.ndarray) -> str:
    """Silhouette, Calinski-Harabasz and Davies-Bouldin of a grouping, as one line."""
    return (
        f"silhouette {metrics.silhouette_score(points, grouping):.3f}  "
        f"calinski_harabasz {metrics.calinski_harabasz_score(points, grouping):9.0f}  "
        f"davies_bouldin {metrics.davies_bouldin_score(points, grouping):.3f}"
    )


def minority_groups(grouping: np.ndarray, labels: np.ndarray) -> list[tuple[int, str]]:
    """(cluster, label) for each cluster that holds a minority of its majority label."""
    table = pd.crosstab(grouping, labels)
    found = []
    for label in table.columns:
        holders = table[label][table[label] > 0]
        majorities = [c for c in holders.index if table.loc[c].idxmax() == label]
        if len(majorities) > 1:
            largest = holders[majorities].idxmax()
            found += [(int(c), str(label)) for c in majorities if c != largest]
    return found


def mixed_clusters(grouping: np.ndarray, labels: np.ndarray) -> dict[int, tuple[str, str]]:
    """Clusters whose second most common label is at least half as common as the first,
    with the two counts ("155 of 1", "173 of 8")."""
    table = pd.crosstab(grouping, labels)
    mixed = {}
    for group, counts in table.iterrows():
        top = counts.sort_values(ascending=False)
        if top.iloc[1] * 2 >= top.iloc[0]:
            mixed[int(group)] = tuple(f"{top.iloc[i]} of {top.index[i]}" for i in (0, 1))
    return mixed


def graph_weights(
    graph: Any, grouping: np.ndarray, labels: np.ndarray, group: int, label: str
) -> tuple[float, float]:
    """Total UMAP-graph weight from one group to the rest of its label and to other labels."""
    edges = graph.tocoo()
    inside = grouping[edges.row] == group
    outside = grouping[edges.col] != group
    chosen = inside & outside
    same = labels[edges.col[chosen]] == label
    weights = edges.data[chosen]
    return float(weights[same].sum()), float(weights[~same].sum())


def report(
    name: str, vectors: np.ndarray, labels: np.ndarray, params: cluster.ClusterParams
) -> None:
    """Print the figures for one feature space."""
    started = time.perf_counter()
    reducer = cluster.fit_umap(vectors, params, params.umap.n_components)
    points = reducer.embedding_
    count = len(np.unique(labels))
    seed = params.random_state
    grouping = cluster.fit_assigner(points, count, params.assign, seed).predict(points)
    agreement = score.label_agreement(pd.Series(labels), grouping)
    print(
        f"\n{name}: {vectors.shape[1]} values; UMAP to {params.umap.n_components}-D with "
        f"{params.umap.n_neighbors} neighbours, {params.assign} into {count}: accuracy "
        f"{agreement['accuracy']:.3f}  ARI {agreement['ari']:.3f}  NMI {agreement['nmi']:.3f}"
    )
    for group, (first, second) in mixed_clusters(grouping, labels).items():
        print(f"  cluster {group} mixes labels: {first}, {second}")
    codes = np.unique(labels, return_inverse=True)[1]
    for space, data in (("UMAP space", points), ("feature space", vectors)):
        print(f"  {space:13s} clustering  {separation(data, grouping)}")
        print(f"  {space:13s} labels      {separation(data, codes)}")
    finer = cluster.fit_assigner(points, count + 1, params.assign, seed).predict(points)
    purity = pd.crosstab(finer, labels).max(axis=1).sum() / len(labels)
    print(f"  {count + 1} clusters: purity {purity:.3f}")
    for group, label in minority_groups(finer, labels):
        size = int((finer == group).sum())
        same, other = graph_weights(reducer.graph_, finer, labels, group, label)
        print(
            f"  a group of {size} images labelled {label} stands apart: UMAP-graph weight "
            f"{same:.1f} to the other {label}s, {other:.1f} to other labels"
        )
    print(f"  ({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="cluster.random_state (default: params.yaml)")
    arguments = parser.parse_args()
    params = cluster.ClusterParams.from_params(settings.load_params())
    if arguments.seed is not None:
        params = params.model_copy(update={"random_state": arguments.seed})
    labels, latent, gray = labelled_data()
    report("the pipeline's latent", latent, labels, params)
    report(f"raw pixels ({DIGIT_SIDE}x{DIGIT_SIDE} gray)", gray, labels, params)


if __name__ == "__main__":
    main()
