"""Display thumbnails stored compactly: each one a small JPEG, in a Parquet table.

prepare writes data/interim/thumbs/, parts of a Parquet table (id, jpeg; the thumbnail size
in each part's metadata; see parts.py), row-aligned with data/interim/ids.parquet; score,
health, patterns and explore read it through Thumbnails, which decodes only the rows asked
for, a row group at a time. A 54x96 thumbnail takes
about 3.7 KB instead of 15.5 KB raw.

This module is apart from images.py on purpose: the model's pixels are keyed by the code
of images.py (prepare.pixels_key), and a change in how thumbnails are stored must not
make other pixels, nor retrain the model.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stages import common, parts

QUALITY = 90
SUBSAMPLING = 0  # 4:4:4: a thumbnail is too small to halve its colors' resolution
# Names how thumbnails are encoded, for prepare's cache key: change it with encode().
ENCODING = f"jpeg quality {QUALITY} subsampling {SUBSAMPLING}"
PARALLEL_DECODE_ROWS = 2000  # fewer rows are decoded in this process: no pool to start
ROW_GROUP_ROWS = 1024
THUMBS_DIR = common.INTERIM_DIR / "thumbs"


def encode(thumbnail: np.ndarray) -> bytes:
    """A height x width x 3 uint8 thumbnail as JPEG bytes (the same bytes for the same
    pixels: Pillow writes no date)."""
    buffer = io.BytesIO()
    Image.fromarray(thumbnail).save(buffer, format="JPEG", quality=QUALITY, subsampling=SUBSAMPLING)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    """JPEG bytes back to a height x width x 3 uint8 thumbnail.

    By OpenCV: the same pixels as Pillow (both decode with libjpeg-turbo, and thumbnails
    keep every color sample), in 85 microseconds a thumbnail instead of 130, as Pillow
    reads each JPEG's headers in Python: 4 s of a day that draws every atlas again.
    """
    import cv2  # 0.16 s to import: only the stages that decode pay it

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if pixels is None:
        raise ValueError("a stored thumbnail is not a readable JPEG")
    return pixels


def write_table(
    path: Path,
    ids: list[str],
    blocks: Iterable[list[bytes]],
    height: int,
    width: int,
    key: str = "",
) -> None:
    """Write a thumbnails table (a part of prepare's) from consecutive blocks of JPEG bytes
    (one block in memory at a time), atomically; the thumbnail size and `key` go into its
    metadata. The key names how thumbnails were made, so that an image's sha256 and the
    key name its thumbnail."""
    schema = pa.schema(
        [("id", pa.string()), ("jpeg", pa.binary())],
        metadata={
            b"height": str(height).encode(),
            b"width": str(width).encode(),
            b"key": key.encode(),
        },
    )
    written = 0
    with common.atomic_output(path) as temporary:
        # No dictionary and no statistics for the JPEG bytes, which never repeat: trying
        # both tripled the time of writing 100,000 thumbnails.
        with pq.ParquetWriter(
            temporary, schema, use_dictionary=False, write_statistics=["id"]
        ) as writer:
            for block in blocks:
                for start in range(0, len(block), ROW_GROUP_ROWS):
                    part = block[start : start + ROW_GROUP_ROWS]
                    names = ids[written : written + len(part)]
                    writer.write_table(
                        pa.table({"id": names, "jpeg": pa.array(part, pa.binary())}, schema=schema),
                        row_group_size=ROW_GROUP_ROWS,
                    )
                    written += len(part)
        if written != len(ids):
            raise ValueError(f"{path}: wrote {written} thumbnails for {len(ids)} ids")


class Thumbnails:
    """The thumbnails of a folder of parts (or of one table), indexed like an
    N x height x width x 3 array: `thumbnails[row]` or `thumbnails[rows]` decodes just
    those rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        paths = parts.part_files(path, ".parquet") if path.is_dir() else [path]
        if not paths or not all(file.is_file() for file in paths):
            raise common.UserError(f"{path} is missing: run `dvc repro prepare` first")
        self.files = [pq.ParquetFile(file) for file in paths]
        metadata = self.files[0].schema_arrow.metadata or {}
        height, width = int(metadata[b"height"]), int(metadata[b"width"])
        self.key = metadata.get(b"key", b"").decode()  # see write_table
        # Every row group of every part, in row order: (part, group) and its first row.
        self.groups = [
            (index, group)
            for index, file in enumerate(self.files)
            for group in range(file.num_row_groups)
        ]
        sizes = [
            self.files[index].metadata.row_group(group).num_rows for index, group in self.groups
        ]
        self.group_starts = np.cumsum([0, *sizes])
        self.shape = (int(self.group_starts[-1]), height, width, 3)
        self.read_group = functools.lru_cache(maxsize=2)(self._read_group)

    def __len__(self) -> int:
        return self.shape[0]

    def ids(self) -> list[str]:
        """The id of each row."""
        return [
            name for file in self.files for name in file.read(columns=["id"]).column(0).to_pylist()
        ]

    def _read_group(self, group: int) -> pa.Array:
        # Kept as Arrow: a reader of a few rows of a group makes Python bytes of those alone.
        index, number = self.groups[group]
        return self.files[index].read_row_group(number, columns=["jpeg"]).column(0).combine_chunks()

    def jpeg(self, row: int) -> bytes:
        """The stored JPEG bytes of one row."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of {len(self)} thumbnails")
        group = int(np.searchsorted(self.group_starts, row, side="right")) - 1
        return self.read_group(group)[row - int(self.group_starts[group])].as_py()

    def jpeg_sets(self, row_sets: list[np.ndarray]) -> list[list[bytes]]:
        """The stored JPEG bytes of several sets of rows, each set in its order, reading
        each row group once for all of them."""
        needed = np.unique(np.concatenate([np.empty(0, np.int64), *row_sets]))
        found = [self.jpeg(int(row)) for row in needed]  # in row order: a group at a time
        return [[found[at] for at in np.searchsorted(needed, rows)] for rows in row_sets]

    def __getitem__(self, rows: int | np.integer | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(rows, int | np.integer):
            return decode(self.jpeg(int(rows)))
        rows = np.asarray(rows, dtype=np.int64)
        result = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        # Row group by row group, so each group is read once however the rows are ordered.
        order = np.argsort(rows, kind="stable")
        workers = common.worker_count() if len(rows) >= PARALLEL_DECODE_ROWS else 1
        chunks = np.array_split(order, workers) if workers > 1 else [order]
        tasks = [(self.path, rows[chunk]) for chunk in chunks]
        for chunk, pixels in zip(chunks, common.map_in_processes(decode_rows, tasks, workers)):
            result[chunk] = pixels
        return result


def decode_rows(task: tuple[Path, np.ndarray]) -> np.ndarray:
    """The thumbnails of some rows of prepare's thumbnails, in the order given (a task for a
    process; rows in order read each row group once)."""
    path, rows = task
    thumbnails = Thumbnails(path)
    result = np.empty((len(rows), *thumbnails.shape[1:]), dtype=np.uint8)
    for index, row in enumerate(rows):
        result[index] = decode(thumbnails.jpeg(int(row)))
    return result


def pick(
    thumbs: Thumbnails | np.ndarray, row_sets: dict[int, np.ndarray]
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The thumbnails of several sets of rows, decoded in one pass over the row groups (a
    set at a time would read most groups again for each set), and each set's rows as
    positions in what is returned."""
    needed = np.unique(np.concatenate([np.empty(0, np.int64), *row_sets.values()]))
    position = {int(row): index for index, row in enumerate(needed)}
    remapped = {
        key: np.array([position[int(row)] for row in rows], dtype=np.int64)
        for key, rows in row_sets.items()
    }
    return thumbs[needed], remapped


# What score and explore take thumbnails from: the stored table, or an array in tests.
ThumbnailRows = Thumbnails | np.ndarray


def load(ids: list[str], path: Path = THUMBS_DIR) -> Thumbnails:
    """prepare's thumbnails, checked to be in the order of `ids`."""
    thumbnails = Thumbnails(path)
    if thumbnails.ids() != ids:
        raise common.UserError(
            f"{path} and {common.EMBEDDINGS_DIR} list different images: run `dvc repro`"
        )
    return thumbnails
