"""Benchmark of the whole pipeline at scale: N distinct ISS-like frames through every stage.

Makes N frames named like the ISS ones (320x180 JPEG by default, so that 100,000 fit this
machine's disk and time; --full-size for 1280x720), copies the project into a scratch
folder, applies the README's ISS preset (without its locations file), and runs the
whole pipeline with one `dvc repro`, as a user does, printing for each stage what it
reports of itself (stages/stage_usage.py):
  wall seconds (its process, start to end), CPU seconds (the stage and its workers), peak
  memory (the largest resident set of the stage or one of its workers), and the disk its
  outputs, its cache in data/cache/ and DVC's cache of its outputs (beyond the files
  linked to the outputs) take;
then DVC's own share of the run (its start, its checks and the lock updates between
stages) and the run's total wall.
Then a no-op `dvc repro` of the whole pipeline, and the project's disk beside the
source's. With --grow P it then adds P% new frames, freezes train, describe, cluster,
vocabulary and mine (`dvc freeze`) and prints the same for the incremental run, and its
share of the full run's time; then, --daily times (3), adds as many again and times one
plain `dvc repro` of them, as a user's daily run.

Usage: python bench/scale.py [--frames N] [--full-size] [--grow P] [--daily N] [--set KEY=VALUE]...
                             [--folder DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.stage_usage import USAGE_FILE_VARIABLE  # noqa: E402
from tools.iss_frames import ISS_SCENES, iss_frame, readme_iss_settings  # noqa: E402
from tools.project_copy import clean_copy  # noqa: E402

SMALL, FULL = (320, 180), (1280, 720)
FIRST_FRAME = datetime(2017, 5, 12, 10, 0, 0)
SCENE_FRAMES = 7  # the camera sees one scene for a few frames in a row
MIB = 2**20


# ----------------------------------------------------------------------------- frames


def write_frame(task: tuple[Path, int, tuple[int, int]]) -> int:
    """Write frame `index` (JPEG, quality 90) into a folder; return its size in bytes."""
    folder, index, (width, height) = task
    scene = (index // SCENE_FRAMES) % len(ISS_SCENES)
    path = folder / f"{(FIRST_FRAME + timedelta(seconds=20 * index)):%Y%m%d-%H%M%S}.jpg"
    iss_frame(scene, seed=index, width=width, height=height).save(path, "JPEG", quality=90)
    return path.stat().st_size


def write_frames(folder: Path, first: int, count: int, size: tuple[int, int]) -> int:
    """Write frames first..first+count-1 on every core; return their total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [(folder, index, size) for index in range(first, first + count)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        return sum(pool.map(write_frame, tasks, chunksize=256))


# ----------------------------------------------------------------------------- project


def apply_preset(project: Path, source: Path, changes: list[str]) -> None:
    """The README's ISS preset in params.yaml, with the frames as the source, then
    `changes` (key=value, as `dvc exp run -S` takes them)."""
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    settings = {**readme_iss_settings(), "sync.source": str(source), "sync.history": "null"}
    settings.update(change.split("=", 1) for change in changes)
    for key, text in settings.items():
        *path, last = key.split(".")
        section = params
        for part in path:
            section = section[part]
        section[last] = yaml.safe_load(text)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def stage_names(project: Path) -> list[str]:
    """The stages of dvc.yaml, in its order (the pipeline's)."""
    return list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])


def stage_outputs(project: Path, stage: str) -> list[Path]:
    """The outputs a stage declares."""
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]
    paths = []
    for entry in [*declared.get("outs", []), *declared.get("metrics", [])]:
        paths.append(project / (entry if isinstance(entry, str) else next(iter(entry))))
    return paths


# ----------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """What one command cost."""

    wall: float
    cpu: float
    peak_mib: float
    printed: str


def measure(command: list[str], cwd: Path, extra_environment: dict[str, str] | None = None) -> Run:
    """Run a command; its wall and CPU seconds and the largest resident set among it and
    the processes it waited for (Linux's rusage of a waited child)."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(extra_environment or {})}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    printed = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{printed}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, printed)


def disk_mib(paths: list[Path], seen: set[tuple[int, int]] | None = None) -> float:
    """The disk the files under `paths` take, each inode once (hard links count once)."""
    seen = set() if seen is None else seen
    total = 0
    for path in filter(Path.exists, paths):
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            info = file.lstat()
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total / MIB


def dvc_cache_mib(project: Path, stage: str, linked: set[tuple[int, int]]) -> float:
    """The disk DVC's cache takes for a stage's outputs as dvc.lock records them, beyond
    the files it shares with the outputs (`linked`: their (device, inode))."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"].get(stage, {})
    cache = project / ".dvc/cache/files/md5"
    objects = []
    for output in lock.get("outs", []):
        digest = output.get("md5", "")
        path = cache / digest[:2] / digest[2:]
        objects.append(path)
        if digest.endswith(".dir") and path.is_file():
            for entry in json.loads(path.read_text()):
                objects.append(cache / entry["md5"][:2] / entry["md5"][2:])
    return disk_mib([path for path in objects if path.is_file()], set(linked))


def inodes(paths: list[Path]) -> set[tuple[int, int]]:
    """The (device, inode) of every file under `paths`."""
    found = set()
    for path in filter(Path.exists, paths):
        for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            info = file.lstat()
            found.add((info.st_dev, info.st_ino))
    return found


def run_pipeline(project: Path, title: str) -> float:
    """One `dvc repro`, printing a line a stage from what each stage reports of itself,
    then DVC's own share and the total; returns the run's wall seconds."""
    usage_file = project.parent / "stage-usage.jsonl"
    usage_file.unlink(missing_ok=True)
    run = measure(
        [sys.executable, "-m", "dvc", "repro"], project, {USAGE_FILE_VARIABLE: str(usage_file)}
    )
    usage = {}
    for line in usage_file.read_text().splitlines():
        reported = json.loads(line)
        usage[reported["stage"]] = reported
    print(f"\n{title}")
    print(f"{'stage':10} {'wall s':>7} {'CPU s':>8} {'peak MiB':>9} {'outputs MiB':>12} "
          f"{'cache MiB':>10} {'DVC cache MiB':>14}")  # fmt: skip
    for stage in stage_names(project):
        if stage not in usage:
            print(f"{stage:10} {'skipped: unchanged or frozen':>30}")
            continue
        reported = usage[stage]
        outputs = stage_outputs(project, stage)
        own_cache = project / "data/cache" / stage
        print(f"{stage:10} {reported['wall']:7.1f} {reported['cpu']:8.1f} "
              f"{reported['peak_mib']:9.0f} {disk_mib(outputs):12.1f} "
              f"{disk_mib([own_cache]):10.1f} "
              f"{dvc_cache_mib(project, stage, inodes(outputs)):14.1f}")  # fmt: skip
        for line in run.printed.splitlines():
            if line.startswith(f"{stage}: "):
                print(f"           {line}")
    stages_wall = sum(reported["wall"] for reported in usage.values())
    print(f"{'DVC':10} {run.wall - stages_wall:7.1f}   its start, checks and lock updates")
    print(f"{'total':10} {run.wall:7.1f} {run.cpu:8.1f} {run.peak_mib:9.0f}   one `dvc repro`")
    return run.wall


def report_disk(project: Path, source_mib: float) -> None:
    """The project's disk beside the source images', each inode counted once."""
    seen: set[tuple[int, int]] = set()
    parts = {
        "collection copy": [project / "data/raw/collections"],
        "per-image caches (data/cache)": [project / "data/cache"],
        "outputs": [project / "data", project / "models", project / "reports", project / "metrics"],
        "DVC cache, beyond the outputs it links": [project / ".dvc/cache"],
    }
    sizes = {}
    for name, paths in parts.items():
        sizes[name] = disk_mib(paths, seen)  # in this order, each file counted once
    total = sum(sizes.values())
    print(f"\nsource images: {source_mib:,.1f} MiB")
    for name, size in sizes.items():
        print(f"  {name}: {size:,.1f} MiB")
    print(f"project total: {total:,.1f} MiB = {total / source_mib:.2f} x the source")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--full-size", action="store_true", help="1280x720 frames")
    parser.add_argument("--grow", type=float, default=0.0, help="then add this %% of new frames")
    parser.add_argument(
        "--daily", type=int, default=3, help="then add as many again, one `dvc repro` each, N times"
    )
    parser.add_argument("--folder", type=Path, default=ROOT / "bench/out/scale")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a param, after the preset"
    )
    arguments = parser.parse_args()

    scratch = arguments.folder
    shutil.rmtree(scratch, ignore_errors=True)
    size = FULL if arguments.full_size else SMALL
    started = time.perf_counter()
    source = scratch / "frames"
    source_bytes = write_frames(source, 0, arguments.frames, size)
    print(
        f"{arguments.frames} frames of {size[0]}x{size[1]} ({source_bytes / MIB:,.1f} MiB) "
        f"written in {time.perf_counter() - started:.0f} s"
    )
    project = scratch / "project"
    clean_copy(project)
    apply_preset(project, source, arguments.set)

    full = run_pipeline(project, f"full run, {arguments.frames} frames, the README's ISS preset")
    measure([sys.executable, "-m", "dvc", "repro"], project)  # DVC's state warm
    noop = measure([sys.executable, "-m", "dvc", "repro"], project)
    print(f"\nno-op `dvc repro`: {noop.wall:.1f} s wall")
    report_disk(project, source_bytes / MIB)

    if arguments.grow > 0:
        new = max(1, round(arguments.frames * arguments.grow / 100))
        source_bytes += write_frames(source, arguments.frames, new, size)
        freeze = ["freeze", "train", "describe", "cluster", "vocabulary", "mine"]
        measure([sys.executable, "-m", "dvc", *freeze], project)
        grown = run_pipeline(
            project,
            f"{new} new frames ({arguments.grow}%), models frozen ({' '.join(freeze[1:])})",
        )
        print(f"\nincremental run: {grown:.1f} s = {100 * grown / full:.1f}% of the full run")
        # The same growth again, as a user runs it: one `dvc repro`, which starts DVC
        # once rather than once a stage; --daily times, since this machine's speed varies
        # from run to run.
        first = arguments.frames + new
        shares = []
        for day in range(arguments.daily):
            source_bytes += write_frames(source, first + day * new, new, size)
            daily = measure([sys.executable, "-m", "dvc", "repro"], project)
            shares.append(100 * daily.wall / full)
            print(
                f"{new} more new frames, one `dvc repro`: {daily.wall:.1f} s = "
                f"{shares[-1]:.1f}% of the full run"
            )
        if shares:
            print(f"daily runs: median {statistics.median(shares):.1f}% of the full run")
        report_disk(project, source_bytes / MIB)

    if not arguments.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
