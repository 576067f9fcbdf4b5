"""prepare: decode every accepted image once into model-size pixels and display thumbnails.

Params:  ImageParams and PrepareParams below (params.yaml, sections image and prepare)
Inputs:  data/raw/manifest.parquet, data/raw/collections/
Outputs: data/interim/pixels/  (parts of N x image.height x image.width x 3, uint8;
                                   see parts.py)
         data/interim/thumbs/  (parts of id, jpeg: each display thumbnail of
                                   thumb_height x thumb_width as a JPEG; see thumbnails.py)
         data/interim/ids.parquet (id and file sha256 of each row, in manifest order; its
                                   metadata's pixels_key names the decode settings)

Decoded pixels and encoded thumbnails are kept in data/cache/prepare/ keyed by sha256 and
by the settings, so when a few images arrive only those are decoded. Byte-identical files
are decoded once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from stages import common, compute, images, parts, settings, thumbnails
from stages.content_cache import ContentCache

STAGE = "prepare"
DECODE_TASK_FILES = 64  # the most files one worker decodes per task


Side = Annotated[int, Field(ge=1, le=4096)]


class ImageParams(settings.Section):
    """params.yaml, section image: the model's input size."""

    SECTION: ClassVar[str] = "image"
    height: Side = Field(32, description="model input height, px (ISS: 27)")
    width: Side = Field(32, description="model input width, px (ISS: 48)")
    fit: images.FitMode = Field(
        "pad",
        description="how another aspect ratio is fitted: squash (stretch, the original's "
        "way), crop (the center) or pad (black borders)",
    )


class PrepareParams(settings.Section):
    """params.yaml, section prepare: the display thumbnails of mosaics and the explorer."""

    SECTION: ClassVar[str] = "prepare"
    thumb_height: Side = Field(54, description="display thumbnail height, px")
    thumb_width: Side = Field(96, description="display thumbnail width, px")


@dataclass(frozen=True)
class DecodeSizes:
    """The two sizes every image is decoded to, from the image and prepare params."""

    model_size: images.ImageSize
    thumb_size: images.ImageSize

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DecodeSizes:
        """Check the image and prepare sections and give the sizes they ask for."""
        image = ImageParams.from_params(params)
        thumbs = PrepareParams.from_params(params)
        return cls(
            model_size=images.ImageSize(image.height, image.width, image.fit),
            thumb_size=images.ImageSize(thumbs.thumb_height, thumbs.thumb_width, image.fit),
        )

    @property
    def targets(self) -> list[images.ImageSize]:
        """The two sizes every image is decoded to: model input, then thumbnail."""
        return [self.model_size, self.thumb_size]


def settings_key(settings: Any) -> str:
    """A key that changes when decode settings (a dataclass) or the decoding code change.

    The decoding code is stages/images.py: an edit elsewhere in this module does not make
    other pixels, so it does not throw the caches away (nor rerun train).
    """
    code = Path(images.__file__).read_bytes()
    text = json.dumps(asdict(settings), sort_keys=True).encode("utf-8")
    return hashlib.sha256(text + hashlib.sha256(code).digest()).hexdigest()[:16]


def cache_key(params: DecodeSizes) -> str:
    """The key of prepare's cache: both sizes, as its segments hold both, and how
    thumbnails are encoded (not the code of thumbnails.py, whose reader may change
    without a thumbnail being decoded again)."""
    encoding = thumbnails.ENCODING.encode()
    return hashlib.sha256(settings_key(params).encode() + encoding).hexdigest()[:16]


def pixels_key(params: DecodeSizes) -> str:
    """The key of the model-size pixels alone, for the caches of later stages: a thumbnail
    setting must not change it (nor, through ids.parquet, rerun train)."""
    return settings_key(params.model_size)


# ----------------------------------------------------------------------------- decoding

# One decoding task: the segment's pixels file with the byte offset of its first row, the
# first row to fill, the files to decode into that row and the next ones (path and
# expected sha256), and the target sizes (model input, thumbnail).
DecodeTask = tuple[tuple[Path, int], int, list[tuple[Path, str]], list[images.ImageSize]]


def decode_file(
    path: Path, expected_sha256: str, targets: list[images.ImageSize]
) -> list[np.ndarray]:
    """Read one collection file, check it is the file the manifest describes, decode it.

    Raises a UserError naming the file when it changed since sync or cannot be decoded.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise common.UserError(f"cannot read {path}: {error.strerror}") from None
    if images.sha256_hex(data) != expected_sha256:
        raise common.UserError(
            f"{path} changed after sync (its sha256 is not the manifest's): run `dvc repro -f sync`"
        )
    try:
        return images.decode_for_targets(data, targets)
    except Exception as error:  # sync accepted it, so this is a changed or unusual file
        raise common.UserError(f"cannot decode {path}: {error}") from None


def task_ranges(count: int, workers: int) -> list[tuple[int, int]]:
    """Split rows [0, count) into tasks that shrink towards the end (guided scheduling).

    Big tasks early keep overhead low; small ones at the end keep every worker busy
    until the last image instead of one finishing a long task alone.
    """
    ranges, first = [], 0
    while first < count:
        size = min(DECODE_TASK_FILES, max(4, (count - first) // (4 * workers)))
        ranges.append((first, min(count, first + size)))
        first += size
    return ranges


def decode_rows(task: DecodeTask) -> list[bytes]:
    """Decode a run of files, write their pixels into the segment's file and return their
    thumbnails as JPEG bytes.

    Workers write the pixel rows themselves, in one block write, so no pixels travel
    between processes and no page of a half-filled file is faulted in one by one; the
    thumbnails, a few KB each, go back to the stage.
    """
    (pixels_path, data_offset), first_row, files, (model_size, thumb_size) = task
    block = np.empty((len(files), model_size.height, model_size.width, 3), dtype=np.uint8)
    thumbs = []
    for offset, (path, expected_sha256) in enumerate(files):
        pixels, thumb = decode_file(path, expected_sha256, [model_size, thumb_size])
        block[offset] = pixels
        thumbs.append(thumbnails.encode(thumb))
    with open(pixels_path, "r+b") as file:
        file.seek(data_offset + first_row * block[0].nbytes)
        file.write(block.data)
    return thumbs


# ----------------------------------------------------------------------------- the cache

ARRAYS = ("pixels",)  # the cache's arrays
BLOBS = ("thumbs",)  # and its blobs: a thumbnail's JPEG


def decode_into_cache(
    cache: ContentCache,
    files: list[tuple[Path, str]],
    targets: list[images.ImageSize],
    workers: int,
) -> None:
    """Decode files (path, sha256) into a new segment of the cache, on `workers` processes."""
    model_size = targets[0]
    shapes = {"pixels": ((model_size.height, model_size.width, 3), np.uint8)}
    with cache.new_segment([sha for _, sha in files], shapes) as segment:
        pixels = segment.arrays["pixels"]
        pixels_file = (Path(pixels.filename), pixels.offset)
        tasks = [
            (pixels_file, first, files[first:end], targets)
            for first, end in task_ranges(len(files), workers)
        ]
        with common.progress_bar(len(files), STAGE) as bar:
            for thumbs in compute.map_tasks(decode_rows, tasks, workers):
                segment.append_blobs("thumbs", thumbs)
                bar.update(len(thumbs))


# ----------------------------------------------------------------------------- the stage


@dataclass
class PrepareSummary:
    """Counts of what one prepare run did."""

    images: int
    decoded: int  # distinct files decoded in this run
    from_cache: int  # distinct files whose arrays the cache already held
    parts_written: int  # parts of the pixels and thumbnails written (the others kept)
    parts: int  # parts of both


def prepare_arrays(
    manifest: pd.DataFrame,
    collection: Path,
    params: DecodeSizes,
    cache_folder: Path,
    pixels_folder: Path,
    thumbs_folder: Path,
    ids_path: Path,
    workers: int,
) -> PrepareSummary:
    """Write the pixels and thumbnails (in parts, see parts.py) and their ids, row-aligned
    with the manifest.

    Only images whose sha256 the cache lacks are decoded; each distinct file once. Only
    parts whose images changed are written again.
    """
    key = cache_key(params)
    cache = ContentCache(cache_folder / key, ARRAYS, BLOBS)
    first_path_of = manifest.drop_duplicates("sha256").set_index("sha256")["path"]
    missing = cache.missing(list(first_path_of.index))
    if missing:
        files = [(collection / first_path_of[sha], sha) for sha in missing]
        decode_into_cache(cache, files, params.targets, workers)

    sha256s = manifest["sha256"].tolist()
    ids = manifest["id"].tolist()
    model, thumb = params.model_size, params.thumb_size

    def write_pixels(path: Path, rows: slice) -> None:
        shape = (len(sha256s[rows]), model.height, model.width, 3)
        common.write_array_in_blocks(path, shape, cache.row_blocks(sha256s[rows], "pixels"))

    def write_thumbs(path: Path, rows: slice) -> None:
        blocks = cache.blob_blocks(sha256s[rows], "thumbs")
        thumbnails.write_table(path, ids[rows], blocks, thumb.height, thumb.width, key)

    written = parts.write_parts(pixels_folder, ".npy", pixels_key(params), sha256s, write_pixels)
    named = parts.id_row_names(ids, sha256s)
    written += parts.write_parts(thumbs_folder, ".parquet", key, named, write_thumbs)
    # The sha256 and the decode key name each row's pixels for the caches of later stages.
    keys = manifest[["id", "sha256"]].reset_index(drop=True)
    common.write_parquet(keys, ids_path, keys={"pixels_key": pixels_key(params)})
    return PrepareSummary(
        images=len(manifest),
        decoded=len(missing),
        from_cache=len(first_path_of) - len(missing),
        parts_written=written,
        parts=2 * len(parts.part_slices(len(manifest))),
    )


def main() -> None:
    """Read params and the manifest, write the arrays."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    all_params = settings.load_params()
    params = DecodeSizes.from_params(all_params)
    compute.use_params(all_params)
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    summary = prepare_arrays(
        manifest,
        common.COLLECTION_DIR,
        params,
        common.CACHE_DIR / STAGE,
        common.PIXELS_DIR,
        thumbnails.THUMBS_DIR,
        common.ARRAY_IDS_FILE,
        common.worker_count(),
    )
    seconds = time.perf_counter() - started
    logger.info(
        "%d images: %d distinct files decoded, %d from the cache; %d of %d parts written; "
        "pixels %dx%d, thumbs %dx%d, fit %s; %.1f s (%.0f decoded images/s)",
        summary.images,
        summary.decoded,
        summary.from_cache,
        summary.parts_written,
        summary.parts,
        params.model_size.height,
        params.model_size.width,
        params.thumb_size.height,
        params.thumb_size.width,
        params.model_size.fit,
        seconds,
        summary.decoded / seconds if seconds else 0.0,
    )


if __name__ == "__main__":
    # Run the importable module's main, so that the tasks sent to a Dask cluster name
    # their functions stages.prepare.*, which the cluster can import, not __main__.*.
    from stages import prepare

    common.run_stage(prepare.main)
