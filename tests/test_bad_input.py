"""Bad input never stops the run: odd file names, huge files, endless history sources and
failures of the system each end in one line, and the rest of the work goes on."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import REPO_ROOT, image_bytes, pattern_image, project_environment, write

from stages import common, project_lock, sync_files, sync_manifest, sync_work


def sync_folder(params: dict[str, Any], source: Path, collection: Path, **changes: Any):
    """Sync a folder with the committed params and some changes, on one process."""
    params = copy.deepcopy(params)
    params["sync"].update({"source": str(source), **changes})
    return sync_work.sync_collection(
        sync_work.SyncParams.from_params(params), collection, None, workers=1
    )


@pytest.fixture
def png() -> bytes:
    """A small good PNG."""
    return image_bytes(pattern_image(24, 16), "PNG")


def test_a_250_byte_name_is_synced(params: dict[str, Any], png: bytes, tmp_path: Path) -> None:
    long_name = "a" * 246 + ".png"  # 250 bytes: the file system allows 255
    write(tmp_path / "source" / long_name, png)
    write(tmp_path / "source" / "short.png", png)
    result = sync_folder(params, tmp_path / "source", tmp_path / "collection")
    assert sorted(result.manifest["path"]) == sorted([long_name, "short.png"])
    assert result.rejected.empty
    assert (tmp_path / "collection" / long_name).read_bytes() == png
    assert not [p for p in (tmp_path / "collection").iterdir() if p.name.startswith(".")]


def test_a_name_that_is_not_utf8_is_rejected_with_a_reason_and_the_rest_synced(
    params: dict[str, Any], png: bytes, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / os.fsdecode(b"caf\xe9.png")).write_bytes(png)
    write(source / "good.png", png)
    result = sync_folder(params, source, tmp_path / "collection")
    assert result.manifest["path"].tolist() == ["good.png"]
    assert result.rejected.to_dict("records") == [
        {"path": "caf\\xe9.png", "reason": "the file name is not valid UTF-8"}
    ]
    # The tables the stage writes can hold what it reports.
    result.rejected.to_csv(tmp_path / "rejected.csv", index=False)
    common.write_parquet(result.manifest, tmp_path / "manifest.parquet")


def test_max_bytes_applies_to_folder_sources(
    params: dict[str, Any], png: bytes, tmp_path: Path
) -> None:
    big = image_bytes(pattern_image(200, 200), "PNG")
    write(tmp_path / "source" / "small.png", png)
    write(tmp_path / "source" / "big.png", big)
    result = sync_folder(params, tmp_path / "source", tmp_path / "collection", max_bytes=len(png))
    assert result.manifest["path"].tolist() == ["small.png"]
    assert result.rejected.to_dict("records") == [
        {"path": "big.png", "reason": f"{len(big)} bytes, over sync.max_bytes ({len(png)})"}
    ]
    assert not (tmp_path / "collection" / "big.png").exists()


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail a test that hangs, instead of hanging the suite."""

    def hung(*_: Any) -> None:
        raise TimeoutError("the test hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_history_that_is_a_named_pipe_is_refused_at_once(tmp_path: Path, alarm: None) -> None:
    pipe = tmp_path / "history.fifo"
    os.mkfifo(pipe)
    with pytest.raises(
        common.UserError, match=f"^sync.history: {re.escape(str(pipe))} is not a regular file$"
    ):
        sync_manifest.read_history(str(pipe))


def test_a_history_that_is_a_device_or_too_big_is_refused(tmp_path: Path, alarm: None) -> None:
    with pytest.raises(common.UserError, match=r"^sync\.history: /dev/zero is not a regular file$"):
        sync_manifest.read_history("/dev/zero")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as file:
        file.truncate(sync_manifest.HISTORY_MAX_BYTES + 1)  # sparse: no disk is used
    with pytest.raises(common.UserError, match=r"huge\.txt has \d+ bytes, over the \d+"):
        sync_manifest.read_history(str(huge))


def test_history_lines_end_at_newlines_only_and_long_lines_are_malformed() -> None:
    long_place = "x" * sync_manifest.HISTORY_MAX_LINE
    text = f"1;2;a;North\u2028Sea\r\n3;4;b;{long_place}\n5;6;c;Lyon\x0bRhone\n"
    table, report = sync_manifest.parse_history(text)
    places = dict(zip(table["id"], table["place"], strict=True))
    assert places == {"a": "North\u2028Sea", "c": "Lyon\x0bRhone"}
    assert report.malformed_lines == [2]
    assert report.lines == 3


def test_a_temporary_copy_left_by_a_killed_sync_is_removed(
    params: dict[str, Any], png: bytes, tmp_path: Path
) -> None:
    write(tmp_path / "source" / "a.png", png)
    leftover = write(tmp_path / "collection" / sync_files.temporary_name("a.png"), b"half")
    sync_folder(params, tmp_path / "source", tmp_path / "collection")
    assert not leftover.exists()


# ----------------------------------------------------------------------------- system failures


def split_project(folder: Path) -> Path:
    """A folder where the split stage can run: params, a manifest, a rejected list and
    the (no) hash pairs."""
    shutil.copy(REPO_ROOT / "params.yaml", folder / "params.yaml")
    manifest = pd.DataFrame({"id": ["a", "b"], "path": ["a.png", "b.png"], "sha256": ["1", "2"]})
    for column in ("latitude",):
        manifest[column] = float("nan")
    manifest["label"] = None
    manifest["blank"] = manifest["duplicate"] = False
    manifest["taken_at"] = pd.NaT
    common.write_parquet(manifest, folder / "data/raw/manifest.parquet")
    write(folder / "data/raw/rejected.csv", b"path,reason\n")
    no_pairs = pd.DataFrame({"id_a": pd.Series(dtype="str"), "id_b": pd.Series(dtype="str")})
    common.write_parquet(no_pairs, folder / "data/processed/hash_pairs.parquet")
    return folder


def run_split_unprivileged(folder: Path) -> subprocess.CompletedProcess[str]:
    """Run the split stage as a user without root's power to write anywhere.

    As root, only the capability to override file permissions is dropped (setpriv).
    """
    command = [sys.executable, "-m", "stages.split"]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *command]
    environment = {**project_environment(), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        command, cwd=folder, env=environment, capture_output=True, text=True, timeout=300
    )


def test_a_read_only_output_folder_gives_one_line_naming_it(tmp_path: Path) -> None:
    project = split_project(tmp_path)
    processed = project / "data/processed"
    processed.chmod(0o555)
    try:
        result = run_split_unprivileged(project)
    finally:
        processed.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: data/processed/split.parquet: permission denied: give this user access to it, "
        "or run in a copy you own"
    ]


def test_a_file_where_a_folder_is_expected_gives_one_line(tmp_path: Path) -> None:
    project = split_project(tmp_path)
    write(project / "metrics", b"not a folder")
    result = run_split_unprivileged(project)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: metrics: something else stands there (a file where a folder is expected?): move it"
    ]


def test_a_missing_templates_folder_is_named_by_its_key(tmp_path: Path) -> None:
    text = (REPO_ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("templates/posters", "templates/nope"))
    command = [sys.executable, "-m", "stages.posters"]
    environment = {**project_environment(), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: posters.templates = 'templates/nope': no such folder"
    ]


def test_a_bug_shows_its_traceback_and_says_it_is_a_bug(tmp_path: Path) -> None:
    project = split_project(tmp_path)
    # A manifest without the columns sync writes: nothing a user can cause.
    common.write_parquet(pd.DataFrame({"id": ["a"]}), project / "data/raw/manifest.parquet")
    result = run_split_unprivileged(project)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1].startswith("error: the traceback above is a bug in smart-iss-posts")


def test_a_killed_stage_leaves_no_staging_folder_past_the_next_run(tmp_path: Path) -> None:
    output = tmp_path / "models/autoencoder"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    leftover = output.with_name(f"{common.staging_prefix(output)}{dead.stdout.strip()}")
    write(leftover / "encoder.keras", b"half a model")
    running = output.with_name(f"{common.staging_prefix(output)}{os.getppid()}")
    running.mkdir()  # a live process's staging folder is left alone
    with common.replace_folder(output) as staging:
        (staging / "encoder.keras").write_bytes(b"model")
    assert (output / "encoder.keras").read_bytes() == b"model"
    assert not leftover.exists()
    assert running.exists()
    stale_file = tmp_path / f"{common.staging_prefix(tmp_path / 'x.json')}{dead.stdout.strip()}"
    stale_file.write_text("{")
    common.write_json({"a": 1}, tmp_path / "x.json")
    assert not stale_file.exists()


# ----------------------------------------------------------------------------- one run at a time


def claim_for(project: Path, process: subprocess.Popen[bytes], command: list[str]) -> None:
    """Write the project's run lock as if `process` ran `command` and held it."""
    lock = project / project_lock.LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    start = project_lock.process_start(process.pid)
    lock.write_text(json.dumps({"pid": process.pid, "start": start, "command": command}))


def test_a_stage_of_a_second_run_stops_at_once_and_runs_once_the_first_is_gone(
    tmp_path: Path,
) -> None:
    project = split_project(tmp_path)
    (project / ".dvc").mkdir()
    first = subprocess.Popen(["sleep", "60"])
    try:
        claim_for(project, first, ["dvc", "repro"])
        result = run_split_unprivileged(project)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"error: another run holds this project: `dvc repro` (process {first.pid}); "
            "wait for it to end, or stop it, then run again"
        ]
        assert not (project / "data/processed/split.parquet").exists()
    finally:
        first.kill()
        first.wait()
    result = run_split_unprivileged(project)  # the holder died: the lock is free
    assert result.returncode == 0, result.stderr
    assert (project / "data/processed/split.parquet").exists()


def test_a_pid_reused_by_another_process_does_not_hold_the_project(tmp_path: Path) -> None:
    project = split_project(tmp_path)
    (project / ".dvc").mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        claim_for(project, other, ["dvc", "repro"])
        lock = project / project_lock.LOCK_FILE
        holder = json.loads(lock.read_text())
        lock.write_text(json.dumps({**holder, "start": "1"}))  # started at another time
        assert run_split_unprivileged(project).returncode == 0
    finally:
        other.kill()
        other.wait()


def test_the_run_of_a_stage_is_its_dvc_ancestor() -> None:
    assert project_lock.is_dvc(["/p/.venv/bin/python", "/p/.venv/bin/dvc", "repro"])
    assert project_lock.is_dvc(["python", "-m", "dvc", "exp", "run"])
    assert not project_lock.is_dvc(["python", "-m", "stages.split"])
    assert project_lock.run_owner(os.getpid()) == os.getpid(), "pytest runs under no dvc"
