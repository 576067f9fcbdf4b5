"""What every stage shares: project paths, params, image decoding, table and array I/O,
atomic writes, logging and the stage entry point.

A stage never imports another stage; it imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageOps
from tqdm import tqdm

# Project paths, relative to the repository root (DVC runs every stage from there).
PARAMS_FILE = Path("params.yaml")
RAW_DIR = Path("data/raw")
COLLECTION_DIR = RAW_DIR / "collections"
MANIFEST_FILE = RAW_DIR / "manifest.parquet"
REJECTED_FILE = RAW_DIR / "rejected.csv"
INTERIM_DIR = Path("data/interim")
PIXELS_FILE = INTERIM_DIR / "pixels.npy"
THUMBS_FILE = INTERIM_DIR / "thumbs.npy"
ARRAY_IDS_FILE = INTERIM_DIR / "ids.parquet"
PROCESSED_DIR = Path("data/processed")
SPLIT_FILE = PROCESSED_DIR / "split.parquet"
EMBEDDINGS_FILE = PROCESSED_DIR / "embeddings.parquet"
CACHE_DIR = Path("data/cache")
METRICS_DIR = Path("metrics")
DATA_METRICS_FILE = METRICS_DIR / "data.json"

# We check the pixel count ourselves (sync.max_pixels) and reject with a clear reason;
# Pillow's own guard would raise or warn from deep inside a decoder instead.
Image.MAX_IMAGE_PIXELS = None

FIT_MODES = ("squash", "crop", "pad")
EXIF_ORIENTATION_TAG = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class UserError(Exception):
    """A problem the user can fix (a bad param, a missing input): shown as one line."""


# ----------------------------------------------------------------------------- params


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml into a dict; a missing or unreadable file is a UserError."""
    try:
        with open(path, encoding="utf-8") as file:
            params = yaml.safe_load(file)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stage from the project root") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must hold a mapping of sections, found {type(params).__name__}")
    return params


def get_param(params: dict[str, Any], key: str) -> Any:
    """Return the value at a dotted key such as 'split.seed', or fail naming the key."""
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserError(f"params.yaml: {key} is missing")
        value = value[part]
    return value


def param_error(key: str, value: Any, allowed: str) -> UserError:
    """The one-line error for a param value that is not allowed."""
    return UserError(f"params.yaml: {key} = {value!r} is not allowed; {allowed}")


def int_param(
    params: dict[str, Any], key: str, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An integer param, at least `minimum` and at most `maximum` when given."""
    value = get_param(params, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise param_error(key, value, "expected an integer")
    if minimum is not None and value < minimum:
        raise param_error(key, value, f"expected an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise param_error(key, value, f"expected an integer <= {maximum}")
    return value


def number_param(
    params: dict[str, Any], key: str, minimum: float | None = None, maximum: float | None = None
) -> float:
    """A finite number param within [minimum, maximum] when given."""
    value = get_param(params, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise param_error(key, value, "expected a number")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise param_error(key, value, f"expected a number in [{low}, {high}]")
    return float(value)


def choice_param(params: dict[str, Any], key: str, choices: Iterable[str]) -> str:
    """A param that must be one of `choices`."""
    value = get_param(params, key)
    allowed = tuple(choices)
    if value not in allowed:
        raise param_error(key, value, "allowed: " + ", ".join(allowed))
    return value


def bool_param(params: dict[str, Any], key: str) -> bool:
    """A true/false param."""
    value = get_param(params, key)
    if not isinstance(value, bool):
        raise param_error(key, value, "expected true or false")
    return value


def optional_str_param(params: dict[str, Any], key: str) -> str | None:
    """A string param that may be null or empty (both mean: not set)."""
    value = get_param(params, key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise param_error(key, value, "expected a string or null")
    return value


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageSize:
    """A target size in pixels, and how a different aspect ratio is reconciled."""

    height: int
    width: int
    fit: str = "squash"


def image_size_param(params: dict[str, Any], height_key: str, width_key: str) -> tuple[int, int]:
    """Read and check a (height, width) pair of params."""
    height = int_param(params, height_key, minimum=1)
    width = int_param(params, width_key, minimum=1)
    for key, value in ((height_key, height), (width_key, width)):
        if value > 4096:
            raise param_error(key, value, "expected at most 4096 pixels")
    return height, width


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright) of an opened image; 1 when absent or unreadable."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not make a good image unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied."""
    width, height = image.size
    if exif_orientation(image) in ROTATED_ORIENTATIONS:
        return height, width
    return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    16-bit and 32-bit integer images are scaled down from the 16-bit range (a plain
    convert would clip them to white); transparent images are laid on black.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        levels = np.asarray(image).astype(np.int64)
        gray = np.clip(levels >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        gray = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0, 255)
        return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _scaled_size(width: int, height: int, target: ImageSize) -> tuple[int, int]:
    """The size the whole image is scaled to before cropping or padding to `target`."""
    if target.fit == "squash":
        return target.width, target.height
    scale_x, scale_y = target.width / width, target.height / height
    scale = max(scale_x, scale_y) if target.fit == "crop" else min(scale_x, scale_y)
    return max(1, round(width * scale)), max(1, round(height * scale))


def draft_request(
    stored_size: tuple[int, int], orientation: int, targets: Iterable[ImageSize]
) -> tuple[int, int]:
    """The smallest (width, height) a JPEG may be DCT-scaled to and still serve every target.

    `stored_size` and the answer are in the file's stored orientation, which is what
    `Image.draft` works in; the targets are upright.
    """
    rotated = orientation in ROTATED_ORIENTATIONS
    width, height = stored_size[::-1] if rotated else stored_size
    needed_width = needed_height = 1
    for target in targets:
        scaled_width, scaled_height = _scaled_size(width, height, target)
        needed_width = max(needed_width, scaled_width)
        needed_height = max(needed_height, scaled_height)
    return (needed_height, needed_width) if rotated else (needed_width, needed_height)


def fit_image(image: Image.Image, target: ImageSize) -> np.ndarray:
    """Resize an RGB image to target.height x target.width x 3 uint8 with a box filter.

    squash stretches to the target; crop scales to cover it and cuts the center;
    pad scales to fit inside it and centers the image on black.
    """
    width, height = image.size
    size = (target.width, target.height)
    if target.fit == "squash":
        resized = image.resize(size, Image.Resampling.BOX)
    elif target.fit == "crop":
        target_aspect = target.width / target.height
        if width / height > target_aspect:
            crop_width = height * target_aspect
            box = ((width - crop_width) / 2, 0.0, (width + crop_width) / 2, float(height))
        else:
            crop_height = width / target_aspect
            box = (0.0, (height - crop_height) / 2, float(width), (height + crop_height) / 2)
        resized = image.resize(size, Image.Resampling.BOX, box=box)
    elif target.fit == "pad":
        inner = _scaled_size(width, height, target)
        inner = (min(inner[0], target.width), min(inner[1], target.height))
        resized = Image.new("RGB", size, (0, 0, 0))
        offset = ((target.width - inner[0]) // 2, (target.height - inner[1]) // 2)
        resized.paste(image.resize(inner, Image.Resampling.BOX), offset)
    else:
        raise ValueError(f"unknown fit {target.fit!r}; allowed: {', '.join(FIT_MODES)}")
    return np.asarray(resized, dtype=np.uint8)


def decode_for_targets(data: bytes, targets: list[ImageSize]) -> list[np.ndarray]:
    """Decode image bytes once, upright and RGB, and return one array per target size.

    JPEGs are decoded with DCT scaling (`Image.draft`) to the smallest size that still
    serves every target, which is several times faster than a full-size decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        orientation = exif_orientation(image)
        image.draft("RGB", draft_request(image.size, orientation, targets))
        upright = image if orientation == 1 else ImageOps.exif_transpose(image)
        rgb = to_rgb(upright)
        return [fit_image(rgb, target) for target in targets]


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of some bytes: the content key of every image."""
    return hashlib.sha256(data).hexdigest()


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
