"""The daily loop: with the models frozen, new images in the source are seen by a plain
`dvc repro`, and only they are decoded, encoded and placed; every earlier image keeps its
cluster and map position, and a run with nothing new runs nothing after sync.

Its own file so that a parallel test run (pytest -n) can place it beside the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml
from conftest import clean_copy, dvc, is_up_to_date, stages_run

from stages import stage_usage
from tools.iss_frames import iss_frame

FIRST_DAY = 40
NEW = 3


def write_frames(folder: Path, first: int, count: int) -> None:
    """`count` small ISS-like frames of five scenes, numbered from `first`."""
    folder.mkdir(exist_ok=True)
    for index in range(first, first + count):
        frame = iss_frame(index % 5, seed=index, width=96, height=54)
        frame.save(folder / f"frame-{index:04d}.png")


def small_project(project: Path, source: Path) -> None:
    """The project's params with a folder source and settings small enough for a test."""
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["sync"]["source"] = str(source)
    params["image"].update({"height": 16, "width": 24, "fit": "squash"})
    params["train"].update({"filters": [8, 4], "epochs": 2, "batch_size": 16})
    params["cluster"].update({"n_clusters": 5})
    params["cluster"]["umap"]["n_neighbors"] = 5
    params["posters"]["count"] = 1
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def test_new_images_flow_through_frozen_models_alone(tmp_path: Path) -> None:
    source = tmp_path / "frames"
    write_frames(source, 0, FIRST_DAY)
    project = clean_copy(tmp_path / "project")
    small_project(project, source)
    dvc(["repro"], project)
    clusters_file = project / "data/processed/clusters.parquet"
    scores_file = project / "data/processed/scores.parquet"
    first_day = pd.read_parquet(clusters_file).set_index("id")
    first_scores = pd.read_parquet(scores_file).set_index("id")

    dvc(["freeze", "train", "describe", "cluster", "vocabulary", "mine"], project)  # as the README

    write_frames(source, FIRST_DAY, NEW)
    usage_file = tmp_path / "usage.jsonl"
    printed = dvc(["repro"], project, {stage_usage.USAGE_FILE_VARIABLE: str(usage_file)})

    ran = stages_run(printed)
    # Each stage that ran reported its own cost, for bench/scale.py, in the order it ran.
    usage = [json.loads(line) for line in usage_file.read_text().splitlines()]
    assert [line["stage"] for line in usage] == ran
    for line in usage:
        assert 0 < line["wall"] < 300 and line["cpu"] > 0 and line["peak_mib"] > 30, line
    assert not {"train", "describe", "cluster", "vocabulary", "mine"} & set(ran), "frozen"
    assert {"sync", "prepare", "embed", "assign"} <= set(ran)
    total, seen = FIRST_DAY + NEW, FIRST_DAY
    decoded = f"prepare: {total} images: {NEW} distinct files decoded, {seen} from the cache"
    assert decoded in printed
    assert f"embed: {total} images: {NEW} encoded, {seen} from the cache" in printed
    assert f"duplicates: {total} images ({NEW} searched, the rest kept from" in printed
    assert f"health: {total} images ({NEW} searched for neighbours, the rest kept" in printed
    assert f"assign: {total} images: {NEW} placed by the model, 0 by the fit, {seen}" in printed
    assert f"patterns: {total} images ({NEW} looked at, the rest kept from" in printed
    # The reference of the silhouettes is the fit sample, which the new images do not join.
    assert f"({NEW} silhouettes computed against {seen} reference images" in printed
    second_scores = pd.read_parquet(scores_file).set_index("id")
    kept = first_scores.index
    pd.testing.assert_series_equal(
        second_scores.loc[kept, "silhouette"], first_scores.loc[kept, "silhouette"]
    )
    second_day = pd.read_parquet(clusters_file).set_index("id")
    assert len(second_day) == total
    pd.testing.assert_frame_equal(second_day.loc[first_day.index], first_day)
    assert second_day["cluster"].between(0, 4).all()

    printed = dvc(["repro"], project, {stage_usage.USAGE_FILE_VARIABLE: str(usage_file)})
    assert stages_run(printed) == ["sync"], "nothing new: nothing after sync runs"
    assert json.loads(usage_file.read_text().splitlines()[-1])["stage"] == "sync", "its check"
    assert f"sync: {total} source files, the collection, the params and the outputs are " in printed
    assert is_up_to_date(project)
