"""Pictures of many thumbnails: mosaics in a grid, saved as PNG. Used by score (cluster
mosaics, outliers), health (near-duplicate groups, quality flags, unusual images) and
patterns (each pattern's best images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages import common

GUTTER = 2  # pixels between thumbnails in a mosaic
PNG_COMPRESS_LEVEL = 1  # see save_png


def mosaic(thumbs: np.ndarray, columns: int) -> Image.Image:
    """Thumbnails in rows of `columns`, left to right then down, on a dark background."""
    count = max(len(thumbs), 1)
    height, width = thumbs.shape[1:3]
    rows = -(-count // columns)
    used_columns = min(columns, count)
    sheet = np.full(
        (rows * (height + GUTTER) + GUTTER, used_columns * (width + GUTTER) + GUTTER, 3),
        24,
        dtype=np.uint8,
    )
    for index, thumb in enumerate(thumbs):
        top = GUTTER + (index // columns) * (height + GUTTER)
        left = GUTTER + (index % columns) * (width + GUTTER)
        sheet[top : top + height, left : left + width] = thumb
    return Image.fromarray(sheet)


def save_png(image: Image.Image, path: Path | str) -> None:
    """Write a PNG (Pillow writes no date, so the same image gives the same bytes).

    zlib's fastest level: the pictures are decoded JPEG thumbnails, which compress little
    better at the default level, and it encoded 7 of score's 14 s at 100,000 images.
    """
    image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def save_png_task(task: tuple[np.ndarray, str]) -> None:
    """Write one picture's pixels as a PNG (a task for a process)."""
    pixels, path = task
    save_png(Image.fromarray(pixels), path)


def save_pngs(pictures: dict[Path, Image.Image], workers: int) -> None:
    """Write each picture as a PNG at its path, on `workers` processes: PNG encoding is
    most of the time of the mosaic reports."""
    tasks = [(np.asarray(image), str(path)) for path, image in pictures.items()]
    for _ in common.map_in_processes(save_png_task, tasks, workers):
        pass


def save_png_atomically(image: Image.Image, path: Path) -> None:
    """Write a PNG through a temporary file renamed into place."""
    with common.atomic_output(path) as temporary:
        save_png(image, temporary)


def kept_mosaics(keys: dict[Any, str], cache: Path, suffix: str = ".png") -> dict[Any, Path]:
    """The mosaics (or other pictures, saved with `suffix`) of `keys` (by a name such as
    the cluster) that an earlier run kept in `cache` (keep_mosaics): these are copied, not
    drawn again."""
    found = {name: cache / f"{key}{suffix}" for name, key in keys.items()}
    return {name: path for name, path in found.items() if path.is_file()}


def keep_mosaics(
    files: dict[Any, Path], keys: dict[Any, str], cache: Path, suffix: str = ".png"
) -> None:
    """Keep this run's mosaics (`files`, by a name such as the cluster) in `cache` under
    their `keys`, and only them: the next run copies those whose key has not changed."""
    if not keys:
        return
    cache.mkdir(parents=True, exist_ok=True)
    for name, key in keys.items():
        if not (cache / f"{key}{suffix}").exists():
            common.write_bytes_atomic(files[name].read_bytes(), cache / f"{key}{suffix}")
    current = {f"{key}{suffix}" for key in keys.values()}
    for old in cache.glob(f"*{suffix}"):
        if old.name not in current:
            old.unlink()
