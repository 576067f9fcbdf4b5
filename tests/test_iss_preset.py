"""The README's preset for an ISS-like collection, run end to end on synthetic frames.

Its own file so that a parallel test run (pytest -n) can place it beside test_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml
from conftest import clean_copy, dvc
from PIL import Image

from stages import parts, thumbnails
from stages.common import read_embeddings
from tools.iss_frames import ISS_SCENES, iss_frame, readme_iss_command


def write_iss_frames(folder: Path, count: int) -> tuple[list[str], list[int]]:
    """Synthetic 1280x720 JPEG frames named like the ISS ones, one blank, and a bad file.

    Returns the stems and the scene of each frame (-1 for the blank one).
    """
    start = pd.Timestamp("2017-05-12 10:00:00")
    stems = [(start + pd.Timedelta(seconds=30 * i)).strftime("%Y%m%d-%H%M%S") for i in range(count)]
    scenes = []
    for index, stem in enumerate(stems):
        scene = (index // 7) % len(ISS_SCENES)  # the camera sees a scene for a while
        image = iss_frame(scene, seed=index)
        if index == 3:  # the feed was off
            image, scene = Image.new("RGB", (1280, 720), (12, 30, 80)), -1
        image.save(folder / f"{stem}.jpg", format="JPEG", quality=90)
        scenes.append(scene)
    (folder / "20170512-235959.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    return stems, scenes


def test_the_readme_iss_preset_runs_end_to_end(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    stems, scenes = write_iss_frames(frames, 240)
    history = tmp_path / "locations.txt"
    history.write_text(
        "".join(f"{10 + i};{-20 - i};{stem};Ocean {i}\n" for i, stem in enumerate(stems[:30]))
        + "not;a;valid line\n"
    )
    project = clean_copy(tmp_path / "project")
    arguments = [
        argument.replace("/data/iss-frames", str(frames)).replace(
            "/data/iss-locations.txt", str(history)
        )
        for argument in readme_iss_command()
    ]
    # The preset as written, with fewer epochs so that CI stays quick.
    dvc(["exp", "run", *arguments, "-S", "train.epochs=3"], project)

    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["image"] == {"height": 27, "width": 48, "fit": "squash"}
    assert params["cluster"]["n_clusters"] == 50
    assert params["words"]["detector"] == "orb"
    found = json.loads((project / "metrics/words.json").read_text())
    # Three of the five synthetic scenes have texture; open sea and thick cloud have none.
    assert found["images_with_keypoints"] >= 120 and found["keypoints"] > 120 * 50
    manifest = pd.read_parquet(project / "data/raw/manifest.parquet").set_index("id")
    assert len(manifest) == 240
    assert manifest.loc[stems[0], "taken_at"] == pd.Timestamp("2017-05-12 10:00:00")
    assert manifest.loc[stems[0], "place"] == "Ocean 0"
    assert manifest["latitude"].notna().sum() == 30
    assert manifest["blank"].sum() == 1 and bool(manifest.loc[stems[3], "blank"])
    rejected = pd.read_csv(project / "data/raw/rejected.csv")
    assert rejected["path"].tolist() == ["20170512-235959.jpg"]
    assert parts.PartedArray(project / "data/interim/pixels").shape == (240, 27, 48, 3)
    thumbs = thumbnails.Thumbnails(project / "data/interim/thumbs")
    assert thumbs.shape == (240, 54, 96, 3)
    ids, embeddings = read_embeddings(project / "data/processed/embeddings")
    assert embeddings.shape == (240, 288), "3x6x16, the original's latent"
    assert sorted(ids) == sorted(stems)

    clusters = pd.read_parquet(project / "data/processed/clusters.parquet").set_index("id")
    assert clusters.loc[ids, "cluster"].nunique() == 50
    metrics = json.loads((project / "metrics/cluster.json").read_text())
    assert metrics["n_clusters"] == 50
    assert "accuracy" not in metrics, "ISS frames carry no labels"
    # 50 clusters of 5 scenes: each cluster should hold frames of one scene.
    scene_of = pd.Series(scenes, index=stems)
    purity = clusters.groupby("cluster").apply(
        lambda members: scene_of[members.index].value_counts().iloc[0] / len(members)
    )
    assert purity.mean() > 0.9
    assert len(list((project / "reports/mosaics").glob("cluster-*.png"))) == 50
