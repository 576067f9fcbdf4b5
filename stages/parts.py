"""Per-image arrays stored as a folder of parts, so that a daily run rewrites (and DVC hashes
again) only the parts whose images changed.

A folder holds part-00000.npy, part-00001.npy, ... (or .parquet), PART_IMAGES rows each in
the collection's order, and _parts.json: each part's key, what its bytes depend on (the
settings that made it and what names its rows: their files' sha256s, and ids where a part
holds them). New images named after the old ones (a
feed's timestamps) change the last part alone.

PartedArray reads a folder of .npy parts as one read-only array of rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stages import common

PART_IMAGES = 8192  # rows of a part
KEYS_FILE = "_parts.json"  # "_": Parquet readers of the folder skip it


def part_slices(count: int) -> list[slice]:
    """The rows of each part of `count` rows (one empty part for none, so that readers
    still find the row shape)."""
    return [
        slice(start, min(start + PART_IMAGES, count))
        for start in range(0, max(count, 1), PART_IMAGES)
    ]


def part_name(number: int, suffix: str) -> str:
    """The file name of part `number` (suffix '.npy' or '.parquet')."""
    return f"part-{number:05d}{suffix}"


def part_files(folder: Path, suffix: str) -> list[Path]:
    """The part files of a folder, in row order."""
    return sorted(folder.glob(f"part-*{suffix}"))


def part_key(key: str, row_names: list[str]) -> str:
    """What a part's bytes depend on: the settings' `key` and what names its rows, in order."""
    digest = hashlib.sha256(key.encode())
    for name in row_names:
        digest.update(name.encode() + b"\n")
    return digest.hexdigest()


def id_row_names(ids: list[str], sha256s: list[str]) -> list[str]:
    """The row names of a part that stores each row's id beside what its file gives: the id
    and the sha256 (a renamed file writes that part again)."""
    return [f"{image_id}\t{sha}" for image_id, sha in zip(ids, sha256s, strict=True)]


def earlier_keys(folder: Path) -> dict[str, str]:
    """The part keys the last run wrote (none when it wrote no readable keys)."""
    try:
        keys = json.loads((folder / KEYS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(name): str(key) for name, key in keys.items()} if isinstance(keys, dict) else {}


def write_parts(
    folder: Path,
    suffix: str,
    key: str,
    row_names: list[str],
    write_part: Callable[[Path, slice], None],
) -> int:
    """Write the parts of rows named by `row_names` (what a row holds depends on: its
    file's sha256, and its id where the part stores ids) into `folder`:
    `write_part(path, rows)` writes one (atomically), and is called only for a part whose
    key changed or whose file is gone. Parts beyond the last are removed. Returns how many
    parts were written.

    The keys file is removed before any part is written and written again last, so a run
    stopped half-way leaves no key that names a part it rewrote.
    """
    folder.mkdir(parents=True, exist_ok=True)
    earlier = earlier_keys(folder)
    (folder / KEYS_FILE).unlink(missing_ok=True)
    keys, written = {}, 0
    for number, rows in enumerate(part_slices(len(row_names))):
        name = part_name(number, suffix)
        keys[name] = part_key(key, row_names[rows])
        if earlier.get(name) == keys[name] and (folder / name).is_file():
            continue
        write_part(folder / name, rows)
        written += 1
    for stale in part_files(folder, suffix)[len(keys) :]:
        stale.unlink()
    common.write_bytes_atomic((json.dumps(keys, indent=1) + "\n").encode(), folder / KEYS_FILE)
    return written


class PartedArray:
    """The rows of a folder of .npy parts (or of one .npy file) as one read-only array:
    `array[rows]` maps and reads just those rows; `shape`, `dtype` and len() as numpy's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        files = part_files(path, ".npy") if path.is_dir() else [path]
        if not files or not all(file.is_file() for file in files):
            raise common.UserError(f"{path} is missing: run `dvc repro prepare` first")
        self.parts = [np.load(file, mmap_mode="r") for file in files]
        shapes = {part.shape[1:] for part in self.parts}
        if len(shapes) != 1:
            raise common.UserError(
                f"{path} holds parts of different shapes: run `dvc repro prepare`"
            )
        self.starts = np.cumsum([0, *(len(part) for part in self.parts)])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: int | np.integer | slice | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(rows, int | np.integer):
            row = int(rows) + (len(self) if rows < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"row {rows} of {len(self)}")
            part = int(np.searchsorted(self.starts, row, side="right")) - 1
            return np.asarray(self.parts[part][row - self.starts[part]])
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        result = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        for part in np.unique(part_of):
            held = part_of == part
            result[held] = self.parts[part][rows[held] - self.starts[part]]
        return result


def load_pixels(path: Path = common.PIXELS_DIR) -> tuple[list[str], PartedArray]:
    """The ids and the rows of the pixels prepare wrote.

    Fails clearly when the pixels or their ids are missing or do not line up.
    """
    if not common.ARRAY_IDS_FILE.exists():
        raise common.UserError(f"{common.ARRAY_IDS_FILE} is missing: run `dvc repro prepare` first")
    ids = common.read_parquet(common.ARRAY_IDS_FILE, made_by="prepare")["id"].tolist()
    array = PartedArray(path)
    if len(ids) != len(array):
        raise common.UserError(
            f"{path} has {len(array)} rows for {len(ids)} ids: run `dvc repro prepare`"
        )
    return ids, array


# What stages take pixels from: prepare's parts, or an array in tests.
PixelRows = PartedArray | np.ndarray
