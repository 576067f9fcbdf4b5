"""Per-image arrays kept by image content, so that an image a stage has seen costs nothing
the next time: prepare's decoded pixels and thumbnails, embed's latent vectors, assign's
placements, score's silhouettes.

A cache is a folder for one setting of everything else the arrays depend on (decode sizes,
the encoder's hash, the cluster model's hash): its name says which. Rows are keyed by the
image file's sha256, never by its name, so a renamed or copied file is still known.
Each run that computes something adds one segment (one .npy file per array, one Parquet
file per blob: bytes of any length, such as a thumbnail's JPEG) and then rewrites the
index; segments are only ever added, so a killed run loses nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stages import common

BLOCK_ROWS = 1024  # rows read from the cache per step, to bound memory
BLOB_GROUP_ROWS = 1024  # rows of a Parquet row group of blobs


def file_key(path: Path, length: int = 16) -> str:
    """The start of a file's sha256: names the cache of what was made with that file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


class SegmentWriter:
    """A segment being written: its memory-mapped arrays, and its blobs appended in row
    order."""

    def __init__(self, arrays: dict[str, np.ndarray], blob_writers: dict[str, pq.ParquetWriter]):
        self.arrays = arrays
        self.blob_writers = blob_writers
        self.blob_rows = dict.fromkeys(blob_writers, 0)

    def append_blobs(self, name: str, values: list[bytes]) -> None:
        """Add the next rows of blob `name`."""
        table = pa.table({"value": pa.array(values, pa.binary())})
        self.blob_writers[name].write_table(table, row_group_size=BLOB_GROUP_ROWS)
        self.blob_rows[name] += len(values)


class ContentCache:
    """Arrays named `arrays` and blobs named `blobs`, stored in segments and indexed by
    sha256."""

    def __init__(self, folder: Path, arrays: tuple[str, ...], blobs: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.arrays = arrays
        self.blobs = blobs
        self.index_path = folder / "index.parquet"
        if self.index_path.exists():
            self.index = self.complete_rows(pd.read_parquet(self.index_path))
        else:
            self.index = pd.DataFrame(
                {
                    "sha256": pd.Series(dtype="str"),
                    "segment": pd.Series(dtype="str"),
                    "row": pd.Series(dtype="int64"),
                }
            )

    def complete_rows(self, index: pd.DataFrame) -> pd.DataFrame:
        """The rows of an index whose segments hold every array: a cache written before a
        stage kept another array forgets those rows, which are then computed again."""
        complete = [
            segment
            for segment in index["segment"].unique()
            if all(self.segment_path(str(segment), name).exists() for name in self.arrays)
            and all(self.blob_path(str(segment), name).exists() for name in self.blobs)
        ]
        return index[index["segment"].isin(complete)].reset_index(drop=True)

    def missing(self, sha256s: list[str]) -> list[str]:
        """The distinct sha256s the cache does not hold, in the order first given."""
        known = set(self.index["sha256"].tolist())
        return [sha for sha in dict.fromkeys(sha256s) if sha not in known]

    def missing_rows(self, sha256s: list[str]) -> tuple[list[str], np.ndarray]:
        """The distinct sha256s the cache lacks, in the order first given, and the row of
        sha256s where each first appears: what a stage computes, each file once."""
        missing = self.missing(sha256s)
        wanted = set(missing)
        first: dict[str, int] = {}
        for row, sha in enumerate(sha256s):
            if sha in wanted and sha not in first:
                first[sha] = row
        return missing, np.array([first[sha] for sha in missing], dtype=np.int64)

    def segment_path(self, segment: str, array: str) -> Path:
        """The .npy file of one array of a segment."""
        return self.folder / f"{segment}.{array}.npy"

    def blob_path(self, segment: str, blob: str) -> Path:
        """The Parquet file of one blob of a segment."""
        return self.folder / f"{segment}.{blob}.parquet"

    @contextlib.contextmanager
    def new_segment(
        self, sha256s: list[str], shapes: dict[str, tuple[tuple[int, ...], Any]]
    ) -> Iterator[SegmentWriter]:
        """Yield a segment of writable memory-mapped arrays, one row per sha256, named as
        `shapes` says ({array: (row shape, dtype)}), and of the cache's blobs, to append in
        row order; it joins the cache when the block succeeds with every row written."""
        segment = f"segment-{uuid.uuid4().hex[:12]}"
        schema = pa.schema([("value", pa.binary())])
        with contextlib.ExitStack() as stack:
            arrays = {
                name: stack.enter_context(
                    common.new_array(
                        self.segment_path(segment, name), (len(sha256s), *shape), dtype
                    )
                )
                for name, (shape, dtype) in shapes.items()
            }
            blob_writers = {}
            for name in self.blobs:
                temporary = stack.enter_context(common.atomic_output(self.blob_path(segment, name)))
                # Blobs never repeat: no dictionary, no statistics (see thumbnails.write_table).
                blob_writers[name] = stack.enter_context(
                    pq.ParquetWriter(
                        temporary, schema, use_dictionary=False, write_statistics=False
                    )
                )
            writer = SegmentWriter(arrays, blob_writers)
            yield writer
            short = {name: rows for name, rows in writer.blob_rows.items() if rows != len(sha256s)}
            if short:
                raise ValueError(f"{self.folder}: blobs {short} for {len(sha256s)} rows")
        added = pd.DataFrame({"sha256": sha256s, "segment": segment, "row": range(len(sha256s))})
        self.index = pd.concat([self.index, added], ignore_index=True)
        common.write_parquet(self.index, self.index_path)

    def add(self, sha256s: list[str], values: dict[str, np.ndarray]) -> None:
        """Add rows already computed in memory (one row per sha256 in each array)."""
        shapes = {name: (array.shape[1:], array.dtype) for name, array in values.items()}
        with self.new_segment(sha256s, shapes) as segment:
            for name, array in values.items():
                segment.arrays[name][:] = array

    def located(self, sha256s: list[str]) -> pd.DataFrame:
        """The segment and row of each sha256, in order; KeyError for one not held."""
        # drop_duplicates makes the merge many-to-one; pandas checking it again costs a
        # quarter of a second at 100,000 rows.
        located = pd.DataFrame({"sha256": sha256s}).merge(
            self.index.drop_duplicates("sha256"), on="sha256", how="left"
        )
        absent = located["sha256"][located["segment"].isna()]
        if len(absent):
            raise KeyError(f"{self.folder} does not hold {absent.iloc[0]}")
        return located

    def blob_blocks(
        self, sha256s: list[str], blob: str, block_rows: int = BLOCK_ROWS
    ) -> Iterator[list[bytes]]:
        """The cached blobs of sha256s, in order, as lists of `block_rows`; each block reads
        only the row groups that hold its rows."""
        located = self.located(sha256s)
        # Each segment's file and row-group sizes, read once rather than once a block.
        opened: dict[str, tuple[pq.ParquetFile, list[int]]] = {}
        for start in range(0, len(located), block_rows):
            rows = located.iloc[start : start + block_rows]
            block: list[bytes] = [b""] * len(rows)
            for segment, segment_rows in rows.groupby("segment", sort=True):
                if str(segment) not in opened:
                    file = pq.ParquetFile(self.blob_path(str(segment), blob))
                    groups = range(file.num_row_groups)
                    opened[str(segment)] = (
                        file,
                        [file.metadata.row_group(i).num_rows for i in groups],
                    )
                file, sizes = opened[str(segment)]
                starts = np.cumsum([0, *sizes])
                wanted = segment_rows["row"].to_numpy()
                group_of = np.searchsorted(starts, wanted, side="right") - 1
                groups = np.unique(group_of)
                values = file.read_row_groups(groups.tolist(), columns=["value"]).column(0)
                # Position of each wanted row among the rows of the groups read.
                before = np.cumsum([0, *(sizes[group] for group in groups)])
                positions = before[np.searchsorted(groups, group_of)] + wanted - starts[group_of]
                taken = values.take(pa.array(positions)).to_pylist()
                for place, value in zip(segment_rows.index.to_numpy() - start, taken, strict=True):
                    block[place] = value
            yield block

    def held_blobs(
        self, sha256s: list[str], blob: str, block_rows: int = BLOCK_ROWS
    ) -> dict[str, bytes]:
        """The cached blobs of those of `sha256s` the cache holds, by sha256, read
        `block_rows` at a time."""
        held = set(self.index["sha256"].tolist())
        known = [sha for sha in dict.fromkeys(sha256s) if sha in held]
        found: dict[str, bytes] = {}
        blocks = self.blob_blocks(known, blob, block_rows)
        for start, block in zip(range(0, len(known), block_rows), blocks, strict=True):
            found.update(zip(known[start : start + block_rows], block, strict=True))
        return found

    def row_blocks(
        self, sha256s: list[str], array: str, block_rows: int = BLOCK_ROWS
    ) -> Iterator[np.ndarray]:
        """The cached rows of sha256s, in order, as blocks of `block_rows` rows.

        Segments are mapped afresh for each block, so the pages read leave memory with
        the block.
        """
        located = self.located(sha256s)
        for start in range(0, len(located), block_rows):
            rows = located.iloc[start : start + block_rows]
            block = None
            for segment, segment_rows in rows.groupby("segment", sort=True):
                source = np.load(self.segment_path(str(segment), array), mmap_mode="r")
                if block is None:
                    block = np.empty((len(rows), *source.shape[1:]), dtype=source.dtype)
                block[segment_rows.index.to_numpy() - start] = source[
                    segment_rows["row"].to_numpy()
                ]
                del source
            assert block is not None
            yield block
