"""The pipeline as a user runs it: real `dvc repro` in a clean copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, pattern_image
from PIL import Image

from stages.common import read_embeddings

STAGES = ("sync", "prepare", "split", "train", "embed")
DATA_STAGES = ("sync", "prepare", "split")  # integer work: bytes match on any machine


def project_environment() -> dict[str, str]:
    """The environment of a user who activated the project's virtual environment."""
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment["TF_CPP_MIN_LOG_LEVEL"] = "3"
    environment.pop("WORKERS", None)
    return environment


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command in the project copy and return what it printed."""
    return subprocess.run(
        command, cwd=cwd, env=project_environment(), capture_output=True, text=True, timeout=900
    )


def dvc(arguments: list[str], cwd: Path) -> str:
    """Run a dvc command through this interpreter; fail the test with its output if it fails."""
    result = run([sys.executable, "-m", "dvc", *arguments], cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def clean_copy(destination: Path) -> Path:
    """Copy the project's tracked and unignored files into a fresh git repository."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for relative in filter(None, listed.split("\0")):
        source = REPO_ROOT / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run([*git, *command], cwd=destination, check=True, capture_output=True)
    return destination


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A clean copy of the project after `dvc repro` on the demo, and what repro printed."""
    project = clean_copy(tmp_path_factory.mktemp("demo") / "project")
    return project, dvc(["repro"], project)


def test_repro_runs_every_stage_and_writes_every_output(demo: tuple[Path, str]) -> None:
    project, printed = demo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in printed
    manifest = pd.read_parquet(project / "data/raw/manifest.parquet")
    assert len(manifest) == 1797
    assert manifest["label"].notna().all()
    assert pd.read_csv(project / "data/raw/rejected.csv").empty
    pixels = np.load(project / "data/interim/pixels.npy", mmap_mode="r")
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert pixels.shape == (1797, params["image"]["height"], params["image"]["width"], 3)
    ids = pd.read_parquet(project / "data/interim/ids.parquet")["id"]
    assert ids.tolist() == manifest["id"].tolist()
    subsets = pd.read_parquet(project / "data/processed/split.parquet")
    assert set(subsets["subset"]) == {"train", "test", "valid"}
    embedded_ids, embeddings = read_embeddings(project / "data/processed/embeddings.parquet")
    assert embedded_ids == manifest["id"].tolist()
    train_metrics = json.loads((project / "metrics/train.json").read_text())
    assert embeddings.shape == (1797, train_metrics["latent_dim"])
    assert np.isfinite(embeddings).all()
    for name in ("encoder.keras", "autoencoder.keras", "spec.json"):
        assert (project / "models/autoencoder" / name).exists()
    assert (project / "reports/train/reconstructions.png").exists()


def output_hashes(lock_file: Path, stages: tuple[str, ...]) -> dict[str, str]:
    """Each output path of some stages of a dvc.lock with its md5."""
    lock = yaml.safe_load(lock_file.read_text())
    return {out["path"]: out["md5"] for stage in stages for out in lock["stages"][stage]["outs"]}


def test_the_committed_outputs_and_metrics_are_reproduced(demo: tuple[Path, str]) -> None:
    project, _ = demo
    produced = output_hashes(project / "dvc.lock", DATA_STAGES)
    assert produced == output_hashes(REPO_ROOT / "dvc.lock", DATA_STAGES)
    for name in ("data.json", "train.json"):
        produced = json.loads((project / "metrics" / name).read_text())
        committed = json.loads((REPO_ROOT / "metrics" / name).read_text())
        assert produced.keys() == committed.keys()
        for key, value in committed.items():
            # Float kernels may round differently on another CPU; counts never differ.
            assert produced[key] == pytest.approx(value, rel=1e-3), (name, key)


def test_plots_render(demo: tuple[Path, str], tmp_path: Path) -> None:
    project, _ = demo
    dvc(["plots", "show", "--out", str(tmp_path / "plots")], project)
    page = (tmp_path / "plots/index.html").read_text()
    assert "val_loss" in page and "reconstructions.png" in page


def test_a_second_repro_does_nothing(demo: tuple[Path, str]) -> None:
    project, _ = demo
    assert "Data and pipelines are up to date." in dvc(["status"], project)
    printed = dvc(["repro"], project)
    assert "Running stage" not in printed
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change" in printed


def test_a_forced_sync_copies_nothing_and_reruns_nothing_downstream(
    demo: tuple[Path, str],
) -> None:
    project, _ = demo
    printed = dvc(["repro", "--force", "sync"], project)
    assert "0 copied" in printed
    printed = dvc(["repro"], project)
    assert "Running stage" not in printed


def test_a_thumbnail_setting_never_retrains_the_model(demo: tuple[Path, str]) -> None:
    project, _ = demo
    params_file = project / "params.yaml"
    original = params_file.read_text()
    try:
        params_file.write_text(original.replace("thumb_width: 96", "thumb_width: 64"))
        printed = dvc(["repro"], project)
        assert "Running stage 'prepare'" in printed
        for stage in ("train", "embed", "split"):
            assert f"Running stage '{stage}'" not in printed
    finally:
        params_file.write_text(original)
        dvc(["repro"], project)


def test_retraining_gives_a_byte_identical_model(demo: tuple[Path, str]) -> None:
    project, _ = demo
    encoder = project / "models/autoencoder/encoder.keras"
    before = encoder.read_bytes()
    printed = dvc(["repro", "--force", "train"], project)
    assert "Running stage 'train'" in printed
    assert encoder.read_bytes() == before
    printed = dvc(["repro"], project)
    assert "Stage 'embed' didn't change" in printed, "an identical model reruns nothing"


def stage_error(stage: str, params_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run one stage in an empty folder with the given params.yaml."""
    (tmp_path / "params.yaml").write_text(params_text)
    environment = project_environment()
    environment["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_bad_param_stops_a_stage_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["split"]["proportions"]["valid"] = 0.5
    result = stage_error("split", yaml.safe_dump(params, sort_keys=False), tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: split.proportions = {'train': 0.7, 'test': 0.2, 'valid': 0.5} "
        "is not allowed; the shares sum to 1.4; they must sum to 1"
    ]


def test_a_missing_source_stops_sync_with_one_line(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["sync"]["source"] = str(tmp_path / "holiday-photos")
    result = stage_error("sync", yaml.safe_dump(params, sort_keys=False), tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: sync.source: folder {tmp_path / 'holiday-photos'} does not exist"
    ]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.parquet"))


def write_iss_frames(folder: Path, count: int) -> list[str]:
    """Synthetic 1280x720 JPEG frames named like the ISS ones, one blank, and a bad file."""
    stems = [f"20170512-10{minute:02d}{second:02d}" for minute in range(60) for second in (0, 30)]
    stems = stems[:count]
    for index, stem in enumerate(stems):
        image = pattern_image(1280, 720, seed=index)
        if index == 3:  # the feed was off
            image = Image.new("RGB", (1280, 720), (12, 30, 80))
        image.save(folder / f"{stem}.jpg", format="JPEG", quality=90)
    (folder / "20170512-115959.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    return stems


def test_an_iss_like_collection_runs_end_to_end(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    stems = write_iss_frames(frames, 40)
    history = tmp_path / "locations.txt"
    history.write_text(
        "".join(f"{10 + i};{-20 - i};{stem};Ocean {i}\n" for i, stem in enumerate(stems[:30]))
        + "not;a;valid line\n"
    )
    project = clean_copy(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sync"].update({"source": str(frames), "history": str(history)})
    params["image"] = {"height": 27, "width": 48, "fit": "squash"}
    params["train"].update({"epochs": 2, "batch_size": 16})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    dvc(["repro"], project)

    manifest = pd.read_parquet(project / "data/raw/manifest.parquet").set_index("id")
    assert len(manifest) == 40
    assert manifest.loc[stems[0], "taken_at"] == pd.Timestamp("2017-05-12 10:00:00")
    assert manifest.loc[stems[0], "place"] == "Ocean 0"
    assert manifest["latitude"].notna().sum() == 30
    assert manifest["blank"].sum() == 1 and bool(manifest.loc[stems[3], "blank"])
    rejected = pd.read_csv(project / "data/raw/rejected.csv")
    assert rejected["path"].tolist() == ["20170512-115959.jpg"]
    assert np.load(project / "data/interim/pixels.npy", mmap_mode="r").shape == (40, 27, 48, 3)
    assert np.load(project / "data/interim/thumbs.npy", mmap_mode="r").shape == (40, 54, 96, 3)
    ids, embeddings = read_embeddings(project / "data/processed/embeddings.parquet")
    assert embeddings.shape == (40, 288), "3x6x16, the original's latent"
    assert sorted(ids) == sorted(stems)
