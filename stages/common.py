"""What every stage shares: the names of the project's artifacts, errors, table and array
I/O, atomic writes, sampling, logging and the stage entry point.

A stage never imports another stage; it imports this module (and `images`, `settings`).
Every artifact path is named here once, so that the stage that writes a file and the
stages that read it cannot disagree.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from stages import project_lock, stage_usage
from stages.stage_log import get_logger as get_logger  # the stages call common.get_logger

# Project paths, relative to the repository root (DVC runs every stage from there).
PARAMS_FILE = Path("params.yaml")
RAW_DIR = Path("data/raw")
COLLECTION_DIR = RAW_DIR / "collections"
MANIFEST_FILE = RAW_DIR / "manifest.parquet"
REJECTED_FILE = RAW_DIR / "rejected.csv"
REMOTE_STATE_FILE = RAW_DIR / "remote.parquet"
INTERIM_DIR = Path("data/interim")
PIXELS_DIR = INTERIM_DIR / "pixels"  # the model-size pixels, in parts (stages/parts.py)
ARRAY_IDS_FILE = INTERIM_DIR / "ids.parquet"
PROCESSED_DIR = Path("data/processed")
SPLIT_FILE = PROCESSED_DIR / "split.parquet"
EMBEDDINGS_DIR = PROCESSED_DIR / "embeddings"  # every image's vector, in parts (embed)
CLUSTERS_FILE = PROCESSED_DIR / "clusters.parquet"
SCORES_FILE = PROCESSED_DIR / "scores.parquet"
NEAR_GROUPS_FILE = PROCESSED_DIR / "near_groups.parquet"
NEIGHBORS_FILE = PROCESSED_DIR / "neighbors.parquet"
IMAGE_PATTERNS_FILE = PROCESSED_DIR / "image_patterns.parquet"  # the patterns each image holds
WORDS_DIR = PROCESSED_DIR / "words"  # every image's visual words, in parts (the words stage)
CACHE_DIR = Path("data/cache")
AUTOENCODER_DIR = Path("models/autoencoder")
ENCODER_FILE = AUTOENCODER_DIR / "encoder.keras"
CLUSTER_MODEL_FILE = Path("models/cluster.joblib")
METRICS_DIR = Path("metrics")
DATA_METRICS_FILE = METRICS_DIR / "data.json"

NOISE = -1  # the cluster of images that hdbscan leaves in no cluster


class UserError(Exception):
    """A problem the user can fix (a bad param, a missing input): shown as one line."""


# ----------------------------------------------------------------------------- I/O


def staging_prefix(path: Path) -> str:
    """The start of the names a stage writes `path` under before moving it into place;
    the writing process's id completes it."""
    return f".{path.name}.tmp-"


def process_alive(pid: int) -> bool:
    """Whether a process of that id runs (perhaps as another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(path: Path) -> None:
    """Remove the staging files and folders that killed runs left beside `path`.

    Only those of processes that are gone: a run in progress keeps its own.
    """
    prefix = staging_prefix(path)
    if not path.parent.is_dir():
        return
    for leftover in path.parent.glob(glob.escape(prefix) + "*"):
        pid = leftover.name[len(prefix) :]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_the_output(path: Path, temporary: Path) -> Iterator[None]:
    """Name the output in an operating-system error that names no file (a full disk on
    write) or only its temporary name, so that the one-line error says what failed."""
    try:
        yield
    except OSError as error:
        if error.errno is not None and error.filename in (None, str(temporary)):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    A stage killed mid-write leaves no half-written output for DVC to cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    temporary = path.with_name(f"{staging_prefix(path)}{os.getpid()}")
    try:
        with naming_the_output(path, temporary):
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
    remove_stale_staging(directory)
    staging = directory.with_name(f"{staging_prefix(directory)}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with naming_the_output(directory, staging):
            staging.mkdir(parents=True)
            yield staging
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write bytes to `path` atomically."""
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)


def write_parquet(frame: pd.DataFrame, path: Path, keys: dict[str, str] | None = None) -> None:
    """Write a table as Parquet, atomically, without the pandas index.

    `keys` go into the file's metadata: what the rows were made with, for the caches of
    the stages that read it (see parquet_keys).
    """
    with atomic_output(path) as temporary:
        if keys is None:
            frame.to_parquet(temporary, index=False, row_group_size=65536)
            return
        table = pa.Table.from_pandas(frame, preserve_index=False)
        metadata = {
            **(table.schema.metadata or {}),
            **{k.encode(): v.encode() for k, v in keys.items()},
        }
        pq.write_table(table.replace_schema_metadata(metadata), temporary, row_group_size=65536)


def write_arrow_parquet(table: pa.Table, path: Path) -> None:
    """Write an Arrow table (list columns, say) as Parquet, atomically."""
    with atomic_output(path) as temporary:
        pq.write_table(table, temporary, row_group_size=65536)


def require_output(path: Path, made_by: str) -> None:
    """Raise a UserError naming `path` and the stage to run when stage `made_by`'s output
    is missing."""
    if not path.exists():
        raise UserError(f"{path} is missing: run `dvc repro {made_by}` first")


def parquet_keys(path: Path, made_by: str) -> dict[str, str]:
    """The keys write_parquet (or another writer) put in a Parquet file's metadata; for a
    folder of parts (the words), those of its first part."""
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.parquet"))), path / "part-00000.parquet")
    require_output(path, made_by)
    metadata = pq.read_schema(path).metadata or {}
    return {key.decode(): value.decode() for key, value in metadata.items() if key != b"pandas"}


def words_parts(path: Path = WORDS_DIR) -> list[Path]:
    """The part files of the words folder, in the collection's order."""
    return sorted(path.glob("part-*.parquet"))


def read_words_table(
    path: Path = WORDS_DIR, columns: list[str] | None = None, ids: list[str] | None = None
) -> pd.DataFrame:
    """The words stage's table (one row per keypoint) from all its parts, its ids as
    categories: tens of millions of id strings are then looked up once per image, not
    once per keypoint. With `ids`, only those images' rows."""
    parts = words_parts(path)
    if not parts:
        raise UserError(f"{path} is missing: run `dvc repro words` first")
    filters = None if ids is None else [("id", "in", ids)]
    sources = [str(part) for part in parts]
    table = pq.read_table(sources, columns=columns, read_dictionary=["id"], filters=filters)
    return table.to_pandas()


def read_arrow(path: Path, made_by: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet table that stage `made_by` writes as Arrow (list columns stay flat),
    with a clear error if it is missing."""
    require_output(path, made_by)
    return pq.read_table(path, columns=columns)


def read_parquet(path: Path, made_by: str, categories: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet table that stage `made_by` writes, with a clear error if it is missing;
    `categories` are read as pandas categories (a column of a few values, repeated)."""
    require_output(path, made_by)
    if categories:
        return pq.read_table(path, read_dictionary=categories).to_pandas()
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


def read_image_keys(ids: list[str] | None = None) -> tuple[list[str], list[str], str]:
    """The ids, file sha256s and pixels key of prepare's rows (data/interim/ids.parquet).

    With `ids`, checks that the rows are those images in that order.
    """
    table = read_parquet(ARRAY_IDS_FILE, made_by="prepare")
    if ids is not None and table["id"].tolist() != ids:
        raise UserError(f"{ARRAY_IDS_FILE} lists other images than its readers: run `dvc repro`")
    pixels_key = parquet_keys(ARRAY_IDS_FILE, made_by="prepare").get("pixels_key", "")
    return table["id"].tolist(), table["sha256"].tolist(), pixels_key


def embedding_parts(path: Path = EMBEDDINGS_DIR) -> list[str]:
    """The files of an embeddings table: the parts of embed's folder, in order (see
    stages/parts.py), or one table."""
    files = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise UserError(f"{path} is missing: run `dvc repro embed` first")
    return [str(file) for file in files]


def embedding_batches(path: Path, rows: int) -> Iterator[np.ndarray]:
    """The embeddings matrix of a table, at most `rows` rows at a time, in order."""
    for _, batch in embedding_batches_holding(path, None, rows):
        yield batch


def embedding_batches_holding(
    path: Path, wanted: np.ndarray | None, rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, matrix) of each batch of at most `rows` rows of the parts of an
    embeddings table that hold any of the `wanted` rows (every part for None), in order:
    a daily run's new images, in the last part, do not make a stage read the others."""
    start = 0
    for part in embedding_parts(path):
        file = pq.ParquetFile(part)
        count = file.metadata.num_rows
        if wanted is not None and not np.any((wanted >= start) & (wanted < start + count)):
            start += count
            continue
        for batch in file.iter_batches(batch_size=rows, columns=["embedding"]):
            column = batch.column(0)
            yield start, column.flatten().to_numpy().reshape(len(batch), column.type.list_size)
            start += len(batch)


def embedding_ids(path: Path = EMBEDDINGS_DIR) -> list[str]:
    """The ids of an embeddings table, in order, without its vectors."""
    return pq.read_table(embedding_parts(path), columns=["id"]).column("id").to_pylist()


def read_embedding_rows(path: Path, rows: np.ndarray, batch_rows: int = 65536) -> np.ndarray:
    """The vectors of the given (sorted) rows of an embeddings table, read a batch at a
    time, so that only the chosen rows are ever held."""
    picked = [np.empty((0, 0), np.float32)]
    for start, batch in embedding_batches_holding(path, rows, batch_rows):
        inside = rows[(rows >= start) & (rows < start + len(batch))]
        picked.append(batch[inside - start])
    return np.concatenate(picked[1:] or picked).astype(np.float32, copy=False)


def is_among(values: Any, allowed: Any) -> np.ndarray:
    """Whether each of `values` (a column, or anything Arrow takes) is among `allowed`, as
    booleans, by Arrow's hash lookup: pandas' isin makes each allowed Arrow string a Python
    string first (0.35 s for 100,000 ids; this takes 5 ms)."""
    looked_up = pa.array(values)
    value_set = pa.array(list(allowed) if isinstance(allowed, dict | set) else allowed)
    if value_set.type != looked_up.type:
        value_set = value_set.cast(looked_up.type)
    found = pc.is_in(looked_up, value_set=value_set).fill_null(False)
    return found.to_numpy(zero_copy_only=False).astype(bool, copy=False)


def taken_strings(values: list[str], rows: np.ndarray) -> pd.Series:
    """values[rows] as a pandas string column, taken by Arrow: a column of millions of
    repeated ids (one per keypoint, say) made from Python strings took 0.9 s."""
    taken = pa.array(values, pa.string()).take(pa.array(np.asarray(rows, np.int64)))
    return pd.Series(pd.array(taken, dtype="str"))


def distinct_images(manifest: pd.DataFrame) -> pd.DataFrame:
    """The id, path and sha256 of every image but exact copies (sync's `duplicate`), in
    manifest order: the images whose visual words are found."""
    keep = ~manifest["duplicate"].fillna(False).astype(bool)
    return manifest.loc[keep, ["id", "path", "sha256"]].reset_index(drop=True)


def read_near_copies(ids: list[str], path: Path = NEAR_GROUPS_FILE) -> np.ndarray:
    """Whether each image is a near-duplicate copy: in a group and not its representative
    (health's near_groups.parquet). Copies stay out of the cluster fit and the mosaics."""
    near_of = read_parquet(path, made_by="health").set_index("id")["near_of"]
    return near_of.reindex(ids).notna().to_numpy()


def read_embeddings(path: Path = EMBEDDINGS_DIR) -> tuple[list[str], np.ndarray]:
    """The ids and the (images x dimension) float32 matrix of an embeddings table."""
    table = pq.read_table(embedding_parts(path))
    column = table.column("embedding")
    # Chunk by chunk into one matrix: combining the chunks first copied it all once more.
    matrix = np.empty((len(table), column.type.list_size), np.float32)
    start = 0
    for chunk in column.chunks:
        matrix[start : start + len(chunk)] = chunk.flatten().to_numpy().reshape(len(chunk), -1)
        start += len(chunk)
    return table.column("id").to_pylist(), matrix


# ----------------------------------------------------------------------------- running

T = TypeVar("T")
R = TypeVar("R")


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
    with multiprocessing.get_context("fork").Pool(workers, one_blas_thread) as pool:
        yield from pool.imap(function, tasks, chunksize=chunksize)


def one_blas_thread() -> None:
    """Keep a pool worker's BLAS on one thread: the pool has a worker per core already, and
    each one's BLAS starting a thread per core as well made the neighbour search slower."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def searched_words(searched: int, total: int, what: str = "searched") -> str:
    """How much of the collection a run searched, for a stage's log line."""
    if searched >= total:
        return f"all {what}"
    return f"{searched} {what}, the rest kept from the last run"


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


# What to do about the operating-system failures a user can meet, by errno.
OS_ERROR_ADVICE = {
    errno.EACCES: "permission denied: give this user access to it, or run in a copy you own",
    errno.EPERM: "not permitted (immutable or protected?): lift that, or run in a copy you own",
    errno.EROFS: "the file system is read-only: run in a writable copy of the project",
    errno.ENOTDIR: "a file stands where a folder is expected: move that file away",
    errno.EEXIST: "something else stands there (a file where a folder is expected?): move it",
    errno.EISDIR: "a folder stands where a file is expected: move that folder away",
    errno.ENOSPC: "no space left on the device: free some space and run again",
    errno.EDQUOT: "the disk quota is full: free some space and run again",
    errno.ENOENT: "no such file or folder: run the stages before it (`dvc repro`)",
    errno.ENAMETOOLONG: "the name is too long for this file system",
}


def os_error_line(error: OSError) -> str:
    """One line for an operating-system failure: the path and what to do."""
    advice = OS_ERROR_ADVICE.get(error.errno or 0, error.strerror or str(error))
    paths = [str(name) for name in (error.filename, error.filename2) if name is not None]
    return f"{' -> '.join(paths)}: {advice}" if paths else f"{advice} ({error})"


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main() and end it with one line on stderr when it fails.

    First it claims the project for its run (stages.project_lock): a stage of a second run
    stops at once. A UserError (a bad param or input), a busy project and an
    operating-system failure (permissions, a full disk, a file where a folder should be)
    exit with 1 and no traceback; anything else is a bug, shown with its traceback and a
    line saying so, exit code 2.
    """
    try:
        holder = project_lock.hold_project()
        with project_lock.dvc_guard(holder, Path(sys.argv[0]).stem):
            main()
    except (UserError, project_lock.ProjectBusyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:
        print(f"error: {os_error_line(error)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        print(
            "error: the traceback above is a bug in smart-iss-posts, not a problem with your "
            "data or params; please report it",
            file=sys.stderr,
        )
        sys.exit(2)
    end_process()


def end_process() -> None:
    """Exit at once, skipping the interpreter's teardown: every output is written and
    closed when a stage's main returns, and tearing down TensorFlow, numba and thread
    pools takes up to two seconds a stage, which a daily run pays ten times."""
    stage_usage.record_usage()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def seeded_digests(keys: list[str], seed: int) -> list[bytes]:
    """The sha256 of each key with the seed: a rank that depends on content alone."""
    return [hashlib.sha256(f"{seed}:{key}".encode()).digest() for key in keys]


def content_sample(keys: list[str], limit: int, seed: int) -> np.ndarray:
    """Row numbers of a sample of at most `limit` rows, in row order, chosen by content:
    the rows whose seeded hash of their key (a file's sha256) ranks lowest, ties by row.

    The choice depends on the keys, never on the order rows arrived in, and a new row
    changes it by at most one row in and one out.
    """
    if len(keys) <= limit:
        return np.arange(len(keys))
    ranks = seeded_digests(keys, seed)
    order = sorted(range(len(keys)), key=lambda index: (ranks[index], index))
    return np.sort(np.array(order[:limit], dtype=np.int64))


SHARE_STEP = 0.9  # page_sample's share of the collection shrinks by this factor at a time
SHARE_ROOM = 0.98  # and expects at most this much of its limit, so chance rarely passes it


def page_sample(keys: list[str], limit: int, seed: int) -> np.ndarray:
    """Row numbers of a sample of at most `limit` rows, in row order, chosen by content and
    stable while the collection grows: the rows whose seeded hash of their key, read as a
    number in [0, 1), falls below a share of the collection, the largest power of
    SHARE_STEP that expects at most SHARE_ROOM of `limit` rows (the lowest `limit` of them
    if chance brings more).

    The share changes only when the collection grows by about a ninth; until then a new
    row joins the sample when its hash falls below the share, and none leaves. So the
    sample holds between about 0.88 and 0.98 times `limit` rows.
    """
    return content_page_sample(keys, limit, seed, 1).rows


@dataclass(frozen=True)
class PageSample:
    """page_sample's rows, with what its supersets need: each row's seeded hash as a number
    in [0, 1) (None when every row is in the sample), and for each phase p of `steps` the
    share of its superset: the sample's share rounded up to the last power SHARE_STEP**j
    with j = p modulo steps (so each phase's superset shrinks every `steps` times the
    sample does, the phases in turn)."""

    rows: np.ndarray
    units: np.ndarray | None
    shares: tuple[float, ...]

    def superset(self, phases: np.ndarray) -> np.ndarray:
        """The rows whose hash falls below the share of their phase (`phases`, one a row),
        in row order: a superset of the sample, every row when the sample holds them all."""
        if self.units is None:
            return np.arange(len(phases))
        return np.flatnonzero(self.units < np.asarray(self.shares)[phases])


def content_page_sample(keys: list[str], limit: int, seed: int, steps: int) -> PageSample:
    """page_sample's rows and its supersets' shares in `steps` phases (see PageSample)."""
    count = len(keys)
    if count <= limit:
        return PageSample(np.arange(count), None, (1.0,) * steps)
    shares = [1.0]  # the share at each step, as page_sample has always multiplied them
    while count * shares[-1] > SHARE_ROOM * limit:
        shares.append(shares[-1] * SHARE_STEP)
    level = len(shares) - 1
    phase_shares = tuple(shares[max(0, level - (level - phase) % steps)] for phase in range(steps))
    digests = seeded_digests(keys, seed)
    units = np.array([int.from_bytes(d[:8], "big") for d in digests], dtype=np.float64) / 2.0**64
    chosen = np.flatnonzero(units < shares[-1])
    if len(chosen) > limit:
        chosen = np.sort(chosen[np.lexsort((chosen, units[chosen]))][:limit])
    return PageSample(chosen, units, phase_shares)


def sample_rows(count: int, limit: int, seed: int) -> np.ndarray:
    """All row numbers when count <= limit, else a seeded sample of `limit`, in order."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))
