"""The pipeline as a user runs it: real `dvc repro` in a clean copy of the project."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import (
    REPO_ROOT,
    clean_copy,
    dvc,
    is_up_to_date,
    project_environment,
    run,
    run_with_stages,
    stages_run,
)
from PIL import Image

from stages import parts, project_lock
from stages.common import read_embeddings

STAGES = (
    *("sync", "prepare", "duplicates", "split", "train", "describe", "embed", "health"),
    "cluster",
    *("assign", "score", "vocabulary", "words", "mine", "patterns", "explore", "posters"),
)
# integer work: bytes match on any machine
DATA_STAGES = ("sync", "prepare", "duplicates", "split")
METRICS_FILES = ("data.json", "train/metrics.json", "health.json", "cluster.json")
ABSL_LINE = re.compile(r"[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] ")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A clean copy of the project after `dvc repro` on the demo, and what repro printed."""
    project = clean_copy(tmp_path_factory.mktemp("demo") / "project")
    return project, dvc(["repro"], project)


def test_repro_runs_every_stage_and_writes_every_output(demo: tuple[Path, str]) -> None:
    project, printed = demo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in printed
    # Only the stages' own lines: nothing from TensorFlow's or Abseil's start-up.
    for line in printed.splitlines():
        assert not ABSL_LINE.match(line) and "absl::" not in line, line
        assert "tensorflow" not in line.lower() or line.startswith(("train:", "embed:")), line
    manifest = pd.read_parquet(project / "data/raw/manifest.parquet")
    assert len(manifest) == 1797
    assert manifest["label"].notna().all()
    assert pd.read_csv(project / "data/raw/rejected.csv").empty
    pixels = parts.PartedArray(project / "data/interim/pixels")
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert pixels.shape == (1797, params["image"]["height"], params["image"]["width"], 3)
    ids = pd.read_parquet(project / "data/interim/ids.parquet")["id"]
    assert ids.tolist() == manifest["id"].tolist()
    subsets = pd.read_parquet(project / "data/processed/split.parquet")
    assert set(subsets["subset"]) == {"train", "test", "valid"}
    embedded_ids, embeddings = read_embeddings(project / "data/processed/embeddings")
    assert embedded_ids == manifest["id"].tolist()
    train_metrics = json.loads((project / "metrics/train/metrics.json").read_text())
    assert embeddings.shape == (1797, train_metrics["latent_dim"])
    assert np.isfinite(embeddings).all()
    for name in ("encoder.keras", "autoencoder.keras", "spec.json"):
        assert (project / "models/autoencoder" / name).exists()
    preview = project / "metrics/train/plots/images/reconstructions.png"
    assert Image.open(preview).size[0] >= 8 * params["image"]["width"]
    for curve in ("train", "eval"):
        losses = pd.read_csv(project / f"metrics/train/plots/metrics/{curve}/loss.tsv", sep="\t")
        assert losses["step"].tolist() == list(range(train_metrics["epochs"]))
        assert (losses["loss"] > 0).all()


def output_hashes(lock_file: Path, stages: tuple[str, ...]) -> dict[str, str]:
    """Each output path of some stages of a dvc.lock with its md5."""
    lock = yaml.safe_load(lock_file.read_text())
    return {out["path"]: out["md5"] for stage in stages for out in lock["stages"][stage]["outs"]}


def test_the_committed_outputs_and_metrics_are_reproduced(demo: tuple[Path, str]) -> None:
    project, _ = demo
    produced = output_hashes(project / "dvc.lock", DATA_STAGES)
    assert produced == output_hashes(REPO_ROOT / "dvc.lock", DATA_STAGES)
    # Training rounds differently on another kind of CPU, and clustering magnifies that;
    # where training reproduced to the last digit, every metric must match exactly.
    same_training = read_metrics(project, "train/metrics.json") == read_metrics(
        REPO_ROOT, "train/metrics.json"
    )
    for name in METRICS_FILES:
        produced, committed = read_metrics(project, name), read_metrics(REPO_ROOT, name)
        assert produced.keys() == committed.keys()
        for key, value in committed.items():
            if same_training or (isinstance(value, int) and key not in COUNTS_FROM_FLOATS):
                assert produced[key] == value, (name, key)
            else:
                assert produced[key] == pytest.approx(value, rel=0.05), (name, key)
    # What the project's CI promises: `dvc metrics diff` against the committed metrics
    # lines up every key, and shows no change where training reproduced.
    result = run([sys.executable, "-m", "dvc", "metrics", "diff", "--all", "--json"], project)
    assert result.returncode == 0, result.stderr
    diff = json.loads(result.stdout or "{}")
    for name in METRICS_FILES:
        assert set(diff[f"metrics/{name}"]) == set(read_metrics(REPO_ROOT, name)), name
    changed = {
        path: {key: row for key, row in rows.items() if row.get("diff") not in (0, None)}
        for path, rows in diff.items()
    }
    if same_training:
        assert not any(changed.values()), changed


# Counts that float work decides: cluster sizes, and where early stopping ends.
COUNTS_FROM_FLOATS = ("size_max", "size_min", "size_median", "best_epoch", "epochs", "step")


def read_metrics(project: Path, name: str) -> dict[str, Any]:
    """A metrics file of a project."""
    return json.loads((project / "metrics" / name).read_text())


def test_metrics_show_prints_every_metrics_file(demo: tuple[Path, str]) -> None:
    project, _ = demo
    printed = dvc(["metrics", "show"], project)
    for name in (
        *("data", "train/metrics", "describe", "health", "cluster", "words", "mine", "patterns"),
    ):
        assert f"metrics/{name}.json" in printed, name


def test_plots_render(demo: tuple[Path, str], tmp_path: Path) -> None:
    project, _ = demo
    dvc(["plots", "show", "--out", str(tmp_path / "plots")], project)
    page = (tmp_path / "plots/index.html").read_text()
    assert "Autoencoder loss" in page and "reconstructions.png" in page
    assert "Silhouette per cluster" in page and "map.png" in page


def test_a_second_repro_runs_only_sync_which_changes_nothing(demo: tuple[Path, str]) -> None:
    project, _ = demo
    assert is_up_to_date(project)
    printed = dvc(["repro"], project)
    assert stages_run(printed) == ["sync"], "sync looks at the source every time"
    assert "0 copied" in printed
    for stage in STAGES[1:]:
        assert f"Stage '{stage}' didn't change" in printed


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


def test_the_demo_visual_words_and_patterns_are_written(demo: tuple[Path, str]) -> None:
    project, _ = demo
    vocabulary = np.load(project / "models/vocabulary.npz")
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert vocabulary["centers"].shape == (params["words"]["vocabulary"], 128)  # SIFT
    words = pd.read_parquet(project / "data/processed/words")
    assert words["word"].between(0, params["words"]["vocabulary"] - 1).all()
    assert words.groupby("id").size().max() <= params["words"]["max_keypoints"]
    found = pd.read_parquet(project / "data/processed/patterns.parquet")
    holders = pd.read_parquet(project / "data/processed/image_patterns.parquet")
    metrics = read_metrics(project, "patterns.json")
    assert metrics["patterns"] == len(found) > 0
    assert found["support"].tolist() == holders.groupby("pattern").size().tolist()
    assert (found["support"] >= params["patterns"]["min_support"]).all()
    reported = min(params["patterns"]["reported"], len(found))
    mosaics = sorted((project / "reports/patterns").glob("pattern-*.png"))
    assert len(mosaics) == reported
    assert (project / "reports/patterns/patterns.csv").exists()


def test_the_demo_explorer_and_posters_are_written(demo: tuple[Path, str]) -> None:
    project, _ = demo
    explorer = project / "reports/explorer"
    prefix = "window.EXPLORER_DATA = "
    data = json.loads((explorer / "data.js").read_text()[len(prefix) : -2])
    clusters = pd.read_parquet(project / "data/processed/clusters.parquet")
    assert data["count"] == 1797
    by_cluster = clusters.sort_values("cluster", kind="stable")  # the page's order
    assert data["columns"]["id"] == by_cluster["id"].tolist()
    assert data["columns"]["cluster"] == by_cluster["cluster"].tolist()
    assert data["collection"] == "../../data/raw/collections/"
    assert sum(data["atlas"]["sizes"]) == 1797
    atlases = [*data["atlas"]["files"], *data["atlas"]["icons"]]
    for name in (*atlases, "index.html", "explorer.js", "renderer.js", "explorer.css"):
        assert (explorer / name).stat().st_size > 0, name

    posters = project / "reports/posters"
    table = pd.read_csv(posters / "posters.csv")
    templates = sorted(p.stem for p in (project / "templates/posters").glob("*.yaml"))
    expected = {f"{name}-{index:02d}.jpg" for name in templates for index in (1, 2)}
    assert set(table["poster"]) == expected
    assert table.groupby("poster")["id"].apply(lambda ids: ids.is_unique).all()
    for name in expected:
        with Image.open(posters / name) as poster:
            assert poster.format == "JPEG" and poster.info["dpi"][0] > 0
    for name in templates:
        assert (posters / f"{name}-preview.png").exists()


def test_the_demo_health_report_and_the_similar_image_command(demo: tuple[Path, str]) -> None:
    project, _ = demo
    manifest = pd.read_parquet(project / "data/raw/manifest.parquet")
    health = pd.read_parquet(project / "data/processed/health.parquet")
    assert health["id"].tolist() == manifest["id"].tolist()
    metrics = read_metrics(project, "health.json")
    assert metrics["near_images"] == int((health["near_group"] > 0).sum())
    assert metrics["grayscale"] == 1797  # the digits are gray
    assert metrics["near_groups_straddling"] == 0
    neighbors = pd.read_parquet(project / "data/processed/neighbors.parquet")
    assert neighbors["neighbors"].map(len).eq(10).all()
    assert (neighbors["distances"].map(lambda d: list(d) == sorted(d))).all()
    assert (project / "reports/health/flag-grayscale.png").exists()
    assert len(pd.read_csv(project / "reports/unusual.csv")) == 100

    image = manifest.sort_values("id").iloc[5]
    result = run(
        [
            sys.executable,
            "-m",
            "stages.similar",
            f"data/raw/collections/{image['path']}",
            "--top",
            "3",
        ],
        project,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["rank", "distance", "id"]
    first = lines[1].split()
    assert first[0] == "1" and float(first[1]) == 0 and first[2] == image["id"], lines
    assert len(lines) == 4
    missing = run([sys.executable, "-m", "stages.similar", "no-such-file.jpg"], project)
    assert missing.returncode == 1 and "cannot read no-such-file.jpg" in missing.stderr


def test_a_poster_setting_reruns_only_the_posters(demo: tuple[Path, str]) -> None:
    project, _ = demo
    params_file = project / "params.yaml"
    original = params_file.read_text()
    first = (project / "reports/posters/landscape-01.jpg").read_bytes()
    try:
        params = yaml.safe_load(original)
        params["posters"]["seed"] += 1
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        printed = dvc(["repro"], project)
        assert stages_run(printed) == ["sync", "posters"]
        assert (project / "reports/posters/landscape-01.jpg").read_bytes() != first
    finally:
        params_file.write_text(original)
        dvc(["repro"], project)
    assert (project / "reports/posters/landscape-01.jpg").read_bytes() == first


def test_the_cluster_model_loads_in_a_fresh_process(demo: tuple[Path, str]) -> None:
    # The stage runs as `python -m stages.cluster`: the model must not be pickled as
    # `__main__.ClusterModel`, which nothing else could load. (That a fit in another
    # process writes the same bytes, and a retrain the same model, is checked on small
    # data in test_cluster.py and test_train.py.)
    project, _ = demo
    script = (
        "import joblib, pandas as pd\n"
        "from stages.common import read_embeddings\n"
        "ids, vectors = read_embeddings()\n"
        "model = joblib.load('models/cluster.joblib')\n"
        "fitted = pd.read_parquet('data/processed/clusters.parquet')\n"
        "assert fitted['id'].tolist() == ids\n"
        "print((model.predict(vectors) == fitted['cluster'].to_numpy()).mean())\n"
    )
    result = run([sys.executable, "-c", script], project)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) == 1.0


@pytest.mark.parametrize("method", ["classical", "hdbscan"])
def test_other_methods_run_as_experiments_and_line_up_in_metrics_diff(
    demo: tuple[Path, str], method: str
) -> None:
    project, _ = demo
    dvc(["exp", "run", "--temp", "-n", method, "-S", f"cluster.method={method}"], project)
    diff = json.loads(dvc(["metrics", "diff", "HEAD", method, "--all", "--json"], project))
    rows = diff["metrics/cluster.json"]
    committed = json.loads((REPO_ROOT / "metrics/cluster.json").read_text())
    assert set(rows) == set(committed)
    for key in ("accuracy", "ari", "nmi", "silhouette", "calinski_harabasz", "n_clusters"):
        assert rows[key]["old"] == pytest.approx(committed[key], rel=1e-3), key
        assert isinstance(rows[key]["new"], int | float), key
    assert rows["accuracy"]["new"] != rows["accuracy"]["old"]
    assert is_up_to_date(project), "--temp keeps the workspace"


def test_bags_of_visual_words_run_as_an_experiment_and_line_up_in_metrics_diff(
    demo: tuple[Path, str],
) -> None:
    project, _ = demo
    settings = ["-S", "train.encoder=bovw", "-S", "describe.pca=50"]
    printed = dvc(["exp", "run", "--temp", "-n", "bovw", *settings], project)
    assert "bags of 2000 visual words" in printed and "epochs" not in printed, "nothing trained"
    diff = json.loads(dvc(["metrics", "diff", "HEAD", "bovw", "--all", "--json"], project))
    described = diff["metrics/describe.json"]
    assert (described["dimension"]["old"], described["dimension"]["new"]) == (256, 50)
    assert described["vocabulary"]["new"] == 2000
    assert 0 < described["explained_variance"]["new"] < 1
    rows = diff["metrics/cluster.json"]
    # The digits grouped by their visual words alone: far above chance (about 0.2).
    assert rows["accuracy"]["new"] > 0.6
    assert rows["accuracy"]["new"] != rows["accuracy"]["old"]
    assert is_up_to_date(project), "--temp keeps the workspace"


def test_a_missing_templates_folder_reaches_the_stage_which_names_the_key(
    demo: tuple[Path, str],
) -> None:
    project, _ = demo
    command = ["exp", "run", "--temp", "-S", "posters.templates=templates/nope"]
    result = run([sys.executable, "-m", "dvc", *command], project)
    assert result.returncode != 0
    printed = result.stdout + result.stderr
    assert "error: posters.templates = 'templates/nope': no such folder" in printed
    assert "Traceback" not in printed


def test_a_second_repro_stops_at_once_while_the_first_runs_on(demo: tuple[Path, str]) -> None:
    project, _ = demo
    command = [sys.executable, "-m", "dvc", "repro", "--force", "-s"]
    environment = project_environment()
    posters = sorted((project / "reports/posters").rglob("*"))
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in posters}
    first = subprocess.Popen(
        [*command, "cluster"], cwd=project, env=environment, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lock = project / project_lock.LOCK_FILE
    deadline = time.monotonic() + 120
    while lock_holder(lock) != first.pid:
        assert time.monotonic() < deadline and first.poll() is None, "cluster never started"
        time.sleep(0.2)  # until the first run's stage holds the project
    second = run([*command, "posters"], project)  # independent of cluster: only our locks stop it
    assert second.returncode != 0
    printed = second.stdout + second.stderr
    holder = f"`{' '.join([*command, 'cluster'])}` (process {first.pid})"
    assert f"{holder}, now in stage cluster: wait for it to end, or stop it" in printed
    assert "is busy" in printed, "DVC itself refuses, before it removes any output"
    first_printed = first.communicate(timeout=600)[0]
    assert first.returncode == 0, first_printed
    assert "cluster: n2d: 10 clusters" in first_printed
    # The refused stage's outputs were never touched, so the project is up to date at once.
    assert posters and {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in posters} == before
    assert is_up_to_date(project)
    table = json.loads((project / ".dvc/tmp/rwlock").read_text())
    assert table.get("write", {}) == {}, "every entry released, ours too"


def lock_holder(lock: Path) -> int | None:
    """The process a project's run lock names (None while there is none, or mid-write)."""
    try:
        return json.loads(lock.read_text()).get("pid")
    except (OSError, ValueError):
        return None


def stage_error(stage: str, params_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run one stage in an empty folder with the given params.yaml."""
    (tmp_path / "params.yaml").write_text(params_text)
    return run_with_stages(["-m", f"stages.{stage}"], tmp_path, timeout=300)


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
