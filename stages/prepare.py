"""prepare: decode every accepted image once into model-size pixels and display thumbnails.

Params (params.yaml): image.height, image.width, image.fit (squash | crop | pad),
  prepare.thumb_height, prepare.thumb_width
Inputs:  data/raw/manifest.parquet, data/raw/collections/
Outputs: data/interim/pixels.npy  (N x image.height x image.width x 3, uint8)
         data/interim/thumbs.npy  (N x thumb_height x thumb_width x 3, uint8)
         data/interim/ids.parquet (the id of each row, in manifest order)

Decoded arrays are kept in data/cache/prepare/ keyed by sha256 and by the settings, so
when a few images arrive only those are decoded. Byte-identical files are decoded once.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages import common

STAGE = "prepare"
COPY_BLOCK_ROWS = 4096  # rows copied from the cache per step, to bound memory


@dataclass(frozen=True)
class PrepareParams:
    """The image and prepare sections of params.yaml, checked."""

    model_size: common.ImageSize
    thumb_size: common.ImageSize

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PrepareParams:
        """Read and check the params prepare uses."""
        height, width = common.image_size_param(params, "image.height", "image.width")
        fit = common.choice_param(params, "image.fit", common.FIT_MODES)
        thumb_height, thumb_width = common.image_size_param(
            params, "prepare.thumb_height", "prepare.thumb_width"
        )
        return cls(
            model_size=common.ImageSize(height, width, fit),
            thumb_size=common.ImageSize(thumb_height, thumb_width, fit),
        )

    @property
    def targets(self) -> list[common.ImageSize]:
        """The two sizes every image is decoded to: model input, then thumbnail."""
        return [self.model_size, self.thumb_size]


def cache_key(params: PrepareParams) -> str:
    """A key that changes when the settings or the decoding code change."""
    code = b"".join(Path(module).read_bytes() for module in (__file__, common.__file__))
    settings = json.dumps(asdict(params), sort_keys=True).encode("utf-8")
    return hashlib.sha256(settings + hashlib.sha256(code).digest()).hexdigest()[:16]


# ----------------------------------------------------------------------------- decoding


def decode_file(task: tuple[Path, str, list[common.ImageSize]]) -> list[np.ndarray]:
    """Read one collection file, check it is the file the manifest describes, decode it.

    Raises a UserError naming the file when it changed since sync or cannot be decoded.
    """
    path, expected_sha256, targets = task
    try:
        data = path.read_bytes()
    except OSError as error:
        raise common.UserError(f"cannot read {path}: {error.strerror}") from None
    if common.sha256_hex(data) != expected_sha256:
        raise common.UserError(
            f"{path} changed after sync (its sha256 is not the manifest's): run `dvc repro -f sync`"
        )
    try:
        return common.decode_for_targets(data, targets)
    except Exception as error:  # sync accepted it, so this is a changed or unusual file
        raise common.UserError(f"cannot decode {path}: {error}") from None


def decode_files(
    tasks: list[tuple[Path, str, list[common.ImageSize]]], workers: int
) -> Iterator[list[np.ndarray]]:
    """Decode files in order, on `workers` processes when there are enough files."""
    if workers <= 1 or len(tasks) < 64:
        yield from (decode_file(task) for task in tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(decode_file, tasks, chunksize=32)


# ----------------------------------------------------------------------------- the cache


class DecodedCache:
    """Decoded arrays for one settings key, stored in segments and indexed by sha256.

    Each run that decodes something adds one segment (a pixels and a thumbs .npy) and
    rewrites the index; segments are only ever added, so a killed run loses nothing.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index_path = folder / "index.parquet"
        if self.index_path.exists():
            self.index = pd.read_parquet(self.index_path)
        else:
            self.index = pd.DataFrame(
                {
                    "sha256": pd.Series(dtype="str"),
                    "segment": pd.Series(dtype="str"),
                    "row": pd.Series(dtype="int64"),
                }
            )

    def missing(self, sha256s: list[str]) -> list[str]:
        """The sha256s the cache does not hold, in the order given."""
        known = set(self.index["sha256"])
        return [sha for sha in sha256s if sha not in known]

    def segment_paths(self, segment: str) -> list[Path]:
        """The pixels and thumbs files of a segment."""
        return [self.folder / f"{segment}.{name}.npy" for name in ("pixels", "thumbs")]

    def add_segment(
        self, sha256s: list[str], arrays: Any, targets: list[common.ImageSize], description: str
    ) -> None:
        """Store decoded arrays (an iterable of [pixels, thumb] per sha256) as a new segment."""
        segment = f"segment-{uuid.uuid4().hex[:12]}"
        paths = self.segment_paths(segment)
        shapes = [(len(sha256s), target.height, target.width, 3) for target in targets]
        with (
            common.new_array(paths[0], shapes[0]) as pixels,
            common.new_array(paths[1], shapes[1]) as thumbs,
        ):
            for row, (pixel_array, thumb_array) in enumerate(
                common.progress(arrays, len(sha256s), description)
            ):
                pixels[row] = pixel_array
                thumbs[row] = thumb_array
        added = pd.DataFrame({"sha256": sha256s, "segment": segment, "row": range(len(sha256s))})
        self.index = pd.concat([self.index, added], ignore_index=True)
        common.write_parquet(self.index, self.index_path)

    def copy_rows(self, sha256s: list[str], pixels_out: np.ndarray, thumbs_out: np.ndarray) -> None:
        """Fill output rows i with the cached arrays of sha256s[i], a block at a time."""
        located = pd.DataFrame({"sha256": sha256s}).merge(
            self.index.drop_duplicates("sha256"), on="sha256", how="left", validate="many_to_one"
        )
        for segment, rows in located.groupby("segment", sort=True):
            sources = [np.load(path, mmap_mode="r") for path in self.segment_paths(str(segment))]
            output_rows = rows.index.to_numpy()
            source_rows = rows["row"].to_numpy()
            for start in range(0, len(rows), COPY_BLOCK_ROWS):
                block = slice(start, start + COPY_BLOCK_ROWS)
                pixels_out[output_rows[block]] = sources[0][source_rows[block]]
                thumbs_out[output_rows[block]] = sources[1][source_rows[block]]


# ----------------------------------------------------------------------------- the stage


@dataclass
class PrepareSummary:
    """Counts of what one prepare run did."""

    images: int
    decoded: int  # distinct files decoded in this run
    from_cache: int  # distinct files whose arrays the cache already held


def prepare_arrays(
    manifest: pd.DataFrame,
    collection: Path,
    params: PrepareParams,
    cache_folder: Path,
    pixels_path: Path,
    thumbs_path: Path,
    ids_path: Path,
    workers: int,
) -> PrepareSummary:
    """Write the pixel and thumbnail arrays and their ids, row-aligned with the manifest.

    Only images whose sha256 the cache lacks are decoded; each distinct file once.
    """
    cache = DecodedCache(cache_folder / cache_key(params))
    first_path_of = manifest.drop_duplicates("sha256").set_index("sha256")["path"]
    missing = cache.missing(list(first_path_of.index))
    if missing:
        tasks = [(collection / first_path_of[sha], sha, params.targets) for sha in missing]
        cache.add_segment(missing, decode_files(tasks, workers), params.targets, STAGE)

    count = len(manifest)
    model, thumb = params.model_size, params.thumb_size
    with (
        common.new_array(pixels_path, (count, model.height, model.width, 3)) as pixels,
        common.new_array(thumbs_path, (count, thumb.height, thumb.width, 3)) as thumbs,
    ):
        cache.copy_rows(manifest["sha256"].tolist(), pixels, thumbs)
    common.write_parquet(manifest[["id"]].reset_index(drop=True), ids_path)
    return PrepareSummary(
        images=count, decoded=len(missing), from_cache=len(first_path_of) - len(missing)
    )


def main() -> None:
    """Read params and the manifest, write the arrays."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = PrepareParams.from_params(common.load_params())
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    summary = prepare_arrays(
        manifest,
        common.COLLECTION_DIR,
        params,
        common.CACHE_DIR / STAGE,
        common.PIXELS_FILE,
        common.THUMBS_FILE,
        common.ARRAY_IDS_FILE,
        common.worker_count(),
    )
    seconds = time.perf_counter() - started
    logger.info(
        "%d images: %d distinct files decoded, %d from the cache; "
        "pixels %dx%d, thumbs %dx%d, fit %s; %.1f s (%.0f decoded images/s)",
        summary.images,
        summary.decoded,
        summary.from_cache,
        params.model_size.height,
        params.model_size.width,
        params.thumb_size.height,
        params.thumb_size.width,
        params.model_size.fit,
        seconds,
        summary.decoded / seconds if seconds else 0.0,
    )


if __name__ == "__main__":
    common.run_stage(main)
