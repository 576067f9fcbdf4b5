"""Where per-image work runs: processes on this machine (the default), or the workers of a
Dask distributed cluster when compute.scheduler names one.

sync (measure, hash, copy), prepare (decode), embed (encode) and assign (place) hand their
per-image work to map_tasks as small tasks; results come back in order and are written by
the stage itself, so a run gives the same bytes wherever its tasks ran. The workers must
see the project folder and the images at the same paths as the stage (a shared file
system), and run on the same kind of CPU for byte-identical vectors (see the README).

Params: ComputeParams below (params.yaml, section compute). It changes where the work
runs, never what it gives, so no stage lists it in dvc.yaml: switching it reruns nothing.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import Field, field_validator

from stages import common, settings

T = TypeVar("T")
R = TypeVar("R")

ADDRESS = re.compile(r"(tcp|tls)://[^\s/:]+:\d+")
CONNECT_SECONDS = 15  # to reach the scheduler
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker thread, to bound what waits in memory


class ComputeParams(settings.Section):
    """params.yaml, section compute."""

    SECTION: ClassVar[str] = "compute"
    scheduler: str | None = Field(
        None,
        description="a Dask scheduler (tcp://host:8786) whose workers run the per-image work "
        "of sync, prepare, embed and assign; null: processes on this machine",
        json_schema_extra={"allowed": "expected null, or tcp://host:port"},
    )

    @field_validator("scheduler")
    @classmethod
    def an_address(cls, value: str | None) -> str | None:
        """A scheduler address: tcp:// or tls://, a host and a port."""
        if value is not None and not ADDRESS.fullmatch(value):
            raise ValueError("expected null, or tcp://host:port")
        return value


SCHEDULER: list[str | None] = [None]  # set by use_params() in a stage's main


def use_params(params: dict[str, Any]) -> None:
    """Run this process's tasks where the compute section of `params` says."""
    SCHEDULER[0] = ComputeParams.from_params(params).scheduler


@functools.lru_cache(maxsize=4)
def loaded(loader: Callable[[Path], Any], path: str, stamp: tuple[int, int]) -> Any:
    """What `loader` made of a file, kept for the next task of this process."""
    return loader(Path(path))


def load_once(path: Path, loader: Callable[[Path], R]) -> R:
    """A model file through `loader` (a module-level function), loaded once per process
    while the file is unchanged: a worker runs many tasks with the same model."""
    status = path.stat()
    return loaded(loader, str(path), (status.st_size, status.st_mtime_ns))


def distributed() -> bool:
    """Whether tasks go to a Dask cluster."""
    return SCHEDULER[0] is not None


def map_tasks(
    function: Callable[[T], R], tasks: list[T], workers: int, chunksize: int = 1
) -> Iterator[R]:
    """Yield function(task) for each task, in order: on the Dask cluster of
    compute.scheduler, else on `workers` forked processes of this machine (see
    common.map_in_processes; workers=1 runs them in this process)."""
    address = SCHEDULER[0]
    if address is None or not tasks:
        yield from common.map_in_processes(function, tasks, workers, chunksize)
        return
    chunks = [tasks[start : start + chunksize] for start in range(0, len(tasks), chunksize)]
    for results in map_on_cluster(address, functools.partial(run_chunk, function), chunks):
        yield from results


def run_chunk(function: Callable[[T], R], chunk: list[T]) -> list[R]:
    """Run a few tasks as one, so that small tasks do not cost a round trip each."""
    return [function(task) for task in chunk]


def map_on_cluster(address: str, function: Callable[[T], R], tasks: list[T]) -> Iterator[R]:
    """Run the tasks on a Dask cluster, a window at a time, results in order.

    The scheduler and the workers get this project's stages package (so they run the code
    the stage runs, with nothing to install), and each task runs in the project folder,
    whose relative paths the tasks use.
    """
    from distributed import Client
    from distributed.diagnostics.plugin import UploadDirectory

    try:
        client = Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
    except OSError as error:
        raise common.UserError(
            f"compute.scheduler = {address!r}: cannot reach the Dask scheduler ({error}); "
            "start it (dask scheduler) or set compute.scheduler: null to run here"
        ) from None
    with client:
        package = Path(__file__).resolve().parent
        # The scheduler unpickles the tasks too, so it gets the package as the workers do.
        client.register_plugin(UploadDirectory(str(package), mode="all"))
        threads = sum(client.nthreads().values())
        if threads == 0:
            raise common.UserError(
                f"compute.scheduler = {address!r}: the scheduler has no workers; "
                f"start some with `dask worker {address}`"
            )
        window = max(1, threads * IN_FLIGHT_PER_WORKER)
        project = str(Path.cwd())
        pending: list[Any] = []
        for task in tasks:
            pending.append(client.submit(run_in_folder, project, function, task, pure=False))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
        workers = len(client.nthreads())
        common.get_logger("compute").info(
            "%d tasks ran on the Dask cluster at %s (%d workers)", len(tasks), address, workers
        )


FOLDER_LOCK = threading.Lock()


def run_in_folder(folder: str, function: Callable[[T], R], task: T) -> R:
    """Run a task on a worker with `folder` as the working directory.

    The working directory belongs to the whole worker process, so tasks of a worker with
    several threads take turns (start workers with --nthreads 1 and more of them).
    """
    with FOLDER_LOCK:
        previous = Path.cwd()
        os.chdir(folder)
        try:
            return function(task)
        finally:
            os.chdir(previous)
