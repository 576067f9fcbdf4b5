"""compute.scheduler: the per-image work of sync, prepare, embed and assign on a real Dask
cluster (a scheduler and two workers on 127.0.0.1, each its own process) gives outputs
byte-identical to a run on this machine's processes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, project_environment, run_with_stages

from tools.iss_frames import iss_frame

FRAMES = 30
OUTPUTS = (
    "data/raw/manifest.parquet",
    "data/raw/rejected.csv",
    "data/interim/pixels/part-00000.npy",
    "data/interim/pixels/_parts.json",
    "data/interim/thumbs/part-00000.parquet",
    "data/interim/thumbs/_parts.json",
    "data/interim/ids.parquet",
    "data/processed/embeddings/part-00000.parquet",
    "data/processed/embeddings/_parts.json",
    "data/processed/clusters.parquet",
)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(module: str, folder: Path, *arguments: str) -> subprocess.Popen[bytes]:
    """Start a Dask command-line program (distributed.cli.MODULE) as a process of its own,
    in a folder where the project's code is not: the stages get it to the cluster."""
    command = [sys.executable, "-m", f"distributed.cli.{module}", *arguments, "--no-dashboard"]
    log = open(folder / f"{module}-{len(list(folder.iterdir()))}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(command, cwd=folder, env=project_environment(), stdout=log, stderr=log)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Dask scheduler with two single-threaded workers, each a process of its own."""
    folder = tmp_path_factory.mktemp("cluster")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = [start("dask_scheduler", folder, "--host", "127.0.0.1", "--port", str(port))]
    processes += [start("dask_worker", folder, address, "--nthreads", "1") for _ in range(2)]
    try:
        wait_for_workers(address, 2)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=60)


def wait_for_workers(address: str, count: int) -> None:
    """Wait until the scheduler has `count` workers."""
    from distributed import Client

    deadline = time.monotonic() + 120
    with Client(address, timeout=60, set_as_default=False) as client:
        while len(client.nthreads()) < count:
            assert time.monotonic() < deadline, "the Dask workers never joined"
            time.sleep(0.5)


def small_params(source: Path, scheduler: str | None) -> str:
    """The project's params, small, with a folder source and a scheduler (or none)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["sync"]["source"] = str(source)
    params["image"].update({"height": 16, "width": 24, "fit": "squash"})
    params["train"].update({"filters": [8, 4], "epochs": 1, "batch_size": 8})
    params["describe"].update({"scaling": "standard", "pca": 4})  # applied on the workers too
    params["embed"]["batch_size"] = 4  # several tasks even for 30 images
    params["cluster"].update({"n_clusters": 3, "fit_sample": 12})  # assign places 18
    params["cluster"]["umap"]["n_neighbors"] = 5
    params["compute"]["scheduler"] = scheduler
    return yaml.safe_dump(params, sort_keys=False)


def run_stage(stage: str, folder: Path) -> str:
    """Run one stage in a folder; fail the test if it fails; what it printed."""
    result = run_with_stages(["-m", f"stages.{stage}"], folder, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stderr


def test_a_dask_cluster_gives_the_same_bytes_as_this_machine(
    scheduler: str, tmp_path: Path
) -> None:
    source = tmp_path / "frames"
    source.mkdir()
    for index in range(FRAMES):
        iss_frame(index % 5, seed=index, width=96, height=54).save(source / f"f-{index:03d}.png")
    here, there = tmp_path / "here", tmp_path / "there"
    for folder, address in ((here, None), (there, scheduler)):
        folder.mkdir()
        (folder / "params.yaml").write_text(small_params(source, address))

    stages = ("sync", "prepare", "duplicates", "split", "train", "describe", "embed", "health")
    for stage in (*stages, "cluster", "assign"):
        run_stage(stage, here)
    data_stages = ("sync", "prepare", "duplicates", "split")
    printed = {stage: run_stage(stage, there) for stage in data_stages}
    shutil.copytree(here / "models", there / "models")  # the same fitted models
    printed.update({stage: run_stage(stage, there) for stage in ("embed", "assign")})

    for stage in ("sync", "prepare", "embed", "assign"):
        assert f"ran on the Dask cluster at {scheduler} (2 workers)" in printed[stage], stage
    assert "assign: 30 images: 18 placed by the model, 12 by the fit" in printed["assign"]
    for output in OUTPUTS:
        assert (there / output).read_bytes() == (here / output).read_bytes(), output


def test_an_unreachable_scheduler_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "frames").mkdir()
    iss_frame(0, seed=0, width=96, height=54).save(tmp_path / "frames" / "a.png")
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "params.yaml").write_text(small_params(tmp_path / "frames", address))
    result = run_with_stages(["-m", "stages.sync"], tmp_path, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: compute.scheduler = '{address}'")
