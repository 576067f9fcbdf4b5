"""What every stage shares: the names of the project's artifacts, errors, table and array
I/O, atomic writes, sampling, logging and the stage entry point.

A stage never imports another stage; it imports this module (and `images`, `settings`).
Every artifact path is named here once, so that the stage that writes a file and the
stages that read it cannot disagree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm import tqdm

# Project paths, relative to the repository root (DVC runs every stage from there).
PARAMS_FILE = Path("params.yaml")
RAW_DIR = Path("data/raw")
COLLECTION_DIR = RAW_DIR / "collections"
MANIFEST_FILE = RAW_DIR / "manifest.parquet"
REJECTED_FILE = RAW_DIR / "rejected.csv"
REMOTE_STATE_FILE = RAW_DIR / "remote.parquet"
INTERIM_DIR = Path("data/interim")
PIXELS_FILE = INTERIM_DIR / "pixels.npy"
THUMBS_FILE = INTERIM_DIR / "thumbs.npy"
ARRAY_IDS_FILE = INTERIM_DIR / "ids.parquet"
PROCESSED_DIR = Path("data/processed")
SPLIT_FILE = PROCESSED_DIR / "split.parquet"
EMBEDDINGS_FILE = PROCESSED_DIR / "embeddings.parquet"
CLUSTERS_FILE = PROCESSED_DIR / "clusters.parquet"
SCORES_FILE = PROCESSED_DIR / "scores.parquet"
CACHE_DIR = Path("data/cache")
AUTOENCODER_DIR = Path("models/autoencoder")
ENCODER_FILE = AUTOENCODER_DIR / "encoder.keras"
CLUSTER_MODEL_FILE = Path("models/cluster.joblib")
METRICS_DIR = Path("metrics")
DATA_METRICS_FILE = METRICS_DIR / "data.json"
REPORTS_DIR = Path("reports")

NOISE = -1  # the cluster of images that hdbscan leaves in no cluster


class UserError(Exception):
    """A problem the user can fix (a bad param, a missing input): shown as one line."""


# ----------------------------------------------------------------------------- I/O


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    A stage killed mid-write leaves no half-written output for DVC to cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


@contextlib.contextmanager
def replace_folder(directory: Path) -> Iterator[Path]:
    """Yield an empty staging folder that replaces `directory` as a whole if the block succeeds.

    `directory` is a stage's own output (DVC removes it before a run anyway); a failed run
    leaves the last good one in place.
    """
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write bytes to `path` atomically."""
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write a table as Parquet, atomically, without the pandas index."""
    with atomic_output(path) as temporary:
        frame.to_parquet(temporary, index=False, row_group_size=65536)


def read_parquet(path: Path, made_by: str) -> pd.DataFrame:
    """Read a Parquet table that stage `made_by` writes, with a clear error if it is missing."""
    if not path.exists():
        raise UserError(f"{path} is missing: run `dvc repro {made_by}` first")
    return pd.read_parquet(path)


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write a table as CSV, floats to 6 significant digits, atomically, without the index."""
    with atomic_output(path) as temporary:
        table.to_csv(temporary, index=False, float_format="%.6g")


def write_json(values: dict[str, Any], path: Path) -> None:
    """Write flat metrics as sorted, indented JSON, atomically."""
    text = json.dumps(values, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(text.encode("utf-8"), path)


@contextlib.contextmanager
def new_array(path: Path, shape: tuple[int, ...], dtype: Any = np.uint8) -> Iterator[np.ndarray]:
    """Yield a writable memory-mapped .npy array that lands at `path` when the block ends.

    Memory stays bounded: rows are written straight to disk, never held all at once.
    """
    with atomic_output(path) as temporary:
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
        try:
            yield array
        finally:
            del array  # unmapped; the kernel writes the pages back, no msync wait needed


def write_array_in_blocks(
    path: Path, shape: tuple[int, ...], blocks: Iterable[np.ndarray], dtype: Any = np.uint8
) -> None:
    """Write a .npy file of `shape` from consecutive row blocks, atomically.

    Only one block is in memory at a time, whatever the number of rows.
    """
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    rows = 0
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as file:
            np.lib.format.write_array_header_1_0(file, header)
            for block in blocks:
                file.write(np.ascontiguousarray(block, dtype=dtype).data)
                rows += len(block)
        if rows != shape[0]:
            raise ValueError(f"{path}: wrote {rows} rows, expected {shape[0]}")


def load_pixels(path: Path = PIXELS_FILE) -> tuple[list[str], np.ndarray]:
    """The ids and the memory-mapped rows of an array that prepare wrote.

    Fails clearly when the array or its ids are missing or do not line up.
    """
    if not path.exists() or not ARRAY_IDS_FILE.exists():
        raise UserError(f"{path} is missing: run `dvc repro prepare` first")
    ids = pd.read_parquet(ARRAY_IDS_FILE)["id"].tolist()
    array = np.load(path, mmap_mode="r")
    if len(ids) != len(array):
        raise UserError(f"{path} has {len(array)} rows for {len(ids)} ids: run `dvc repro prepare`")
    return ids, array


def load_thumbs(ids: list[str]) -> np.ndarray:
    """prepare's display thumbnails (memory-mapped), checked to be in the order of `ids`."""
    thumb_ids, thumbs = load_pixels(THUMBS_FILE)
    if thumb_ids != ids:
        raise UserError(
            f"{THUMBS_FILE} and {EMBEDDINGS_FILE} list different images: run `dvc repro`"
        )
    return thumbs


def read_embeddings(path: Path = EMBEDDINGS_FILE) -> tuple[list[str], np.ndarray]:
    """The ids and the (images x dimension) float32 matrix of an embeddings table."""
    if not path.exists():
        raise UserError(f"{path} is missing: run `dvc repro embed` first")
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    matrix = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    return table.column("id").to_pylist(), matrix.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- running

T = TypeVar("T")
R = TypeVar("R")


def get_logger(stage: str) -> logging.Logger:
    """A logger that prints 'stage: message' lines to stderr."""
    logger = logging.getLogger(stage)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def progress_bar(total: int, description: str) -> tqdm:
    """A progress bar counting images; silent when stderr is not a terminal."""
    return tqdm(total=total, desc=description, unit="img", disable=None, leave=False)


def progress(items: Iterable[T], total: int, description: str) -> Iterable[T]:
    """Iterate over a long loop's items with a progress bar."""
    with progress_bar(total, description) as bar:
        for item in items:
            yield item
            bar.update(1)


def map_in_processes(
    function: Callable[[T], R], tasks: list[T], workers: int, chunksize: int = 1
) -> Iterator[R]:
    """Yield function(task) for each task, in order, computed on `workers` forked processes.

    With one worker or one task it runs in this process, with no pool to start.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(function, tasks, chunksize=chunksize)


def worker_count() -> int:
    """Processes to use: $WORKERS when set, else every core.

    Not a param: it changes how fast a stage runs, never what it writes.
    """
    value = os.environ.get("WORKERS", "")
    if value.strip():
        try:
            count = int(value)
        except ValueError:
            raise UserError(f"WORKERS={value!r} is not an integer") from None
        if count < 1:
            raise UserError(f"WORKERS={value!r} must be at least 1")
        return count
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a UserError ends it with one line on stderr and exit code 1."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def sample_rows(count: int, limit: int, seed: int) -> np.ndarray:
    """All row numbers when count <= limit, else a seeded sample of `limit`, in order."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))
