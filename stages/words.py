"""words: every image as visual words: its local features, each the word of the nearest
center of the vocabulary (stages/vocabulary.py fits it).

Params:  WordsParams below (params.yaml, section words)
Inputs:  models/vocabulary.npz, data/raw/manifest.parquet (id, path, sha256, duplicate),
         data/raw/collections/ (the originals)
Outputs: data/processed/words/ (part-NNNNN.parquet, PART_IMAGES images each in the
         collection's order: one row per kept keypoint: id, word, x, y, size; x and y are
         shares of the image's width and height, size a share of its long side, so they
         map onto any thumbnail), metrics/words.json (counts)

Each image is decoded upright, turned gray and scaled so that its long side is `side`
px (a small one enlarged at most MAX_UPSCALE times: SIFT finds little in a 32 px
image). The detector (`sift`, as minIA used, or `orb`, several times faster) keeps the
`max_keypoints` strongest keypoints.
The vocabulary is MiniBatchKMeans of the descriptors of a sample of images chosen by
their files' sha256 (so it does not depend on the order of arrival), fitted by the
vocabulary stage; every keypoint is then the word of its nearest center. An image's
words are kept in data/cache/words/ by its sha256, the vocabulary file's hash and the
detector's params: with the vocabulary frozen (`dvc freeze vocabulary`) a run finds the
words of new images only. ORB's binary descriptors are clustered as their
256 bits. Exact copies (sync's `duplicate` flag) are left out: they would only repeat
their original's words. A file that cannot be decoded is named in a warning and has no
words; the run goes on.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field

from stages import common, images, settings
from stages.content_cache import ContentCache, file_key

STAGE = "words"
VOCABULARY_FILE = Path("models/vocabulary.npz")
CACHE_DIR = common.CACHE_DIR / "words"
WORDS_DIR = common.WORDS_DIR
PART_IMAGES = 8192  # images of a part of the words folder, in the collection's order
KEYPOINT_BYTES = 16  # a packed keypoint: word, x, y, size as float32
WORDS_METRICS_FILE = common.METRICS_DIR / "words.json"
WORD_COLUMNS = ["id", "word", "x", "y", "size"]
MAX_SAMPLE_DESCRIPTORS = 250_000  # the vocabulary's fit sees at most this many
TASK_IMAGES = 16  # images a worker detects in one task
BLOCK = 4096  # cached images read at once
MAX_UPSCALE = 4  # a small image is enlarged at most this much towards `side`


class WordsParams(settings.Section):
    """params.yaml, section words."""

    SECTION: ClassVar[str] = "words"
    detector: Literal["sift", "orb", "encoder"] = Field(
        "sift",
        description="local features: sift (as minIA), orb (several times faster), or "
        "encoder: the cells of the trained encoder's last feature map (dense, learned)",
    )
    side: int = Field(
        480, ge=64, le=4096, description="each image's long side, px, before detection"
    )
    max_keypoints: int = Field(
        300, ge=1, le=10000, description="the strongest keypoints kept per image"
    )
    vocabulary: int = Field(
        2000, ge=2, le=100000, description="visual words: MiniBatchKMeans centers"
    )
    vocabulary_images: int = Field(
        2000, ge=1, description="images whose descriptors the vocabulary is fitted on"
    )
    seed: int = Field(0, ge=0, description="seed of the sample and of the vocabulary's fit")


@dataclass(frozen=True)
class Keypoints:
    """One image's kept keypoints: positions (x, y as shares of width and height, size
    as a share of the long side; float32, n x 3) and descriptors (float32, n x d)."""

    places: np.ndarray
    descriptors: np.ndarray


# ----------------------------------------------------------------------------- features


def detector(name: str, max_keypoints: int) -> object:
    """An OpenCV detector and descriptor."""
    import cv2

    cv2.setNumThreads(1)  # one process a core already
    if name == "sift":
        return cv2.SIFT_create(nfeatures=max_keypoints)
    return cv2.ORB_create(nfeatures=max_keypoints)


def gray_image(data: bytes, side: int) -> np.ndarray:
    """Image bytes decoded upright and gray, scaled so that the long side is `side` px
    (enlarged at most MAX_UPSCALE times)."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = images.upright_size(image)
        scale = min(side / max(width, height), MAX_UPSCALE)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if scale < 1:
            orientation = images.exif_orientation(image)
            target = images.ImageSize(height=size[1], width=size[0])
            image.draft("RGB", images.draft_request(image.size, orientation, [target]))
        rgb = images.to_rgb(images.upright(image))
        return np.asarray(rgb.resize(size, Image.Resampling.BILINEAR).convert("L"))


def descriptor_values(descriptors: np.ndarray | None, name: str) -> np.ndarray:
    """Descriptors as float32 rows: ORB's 32 bytes as their 256 bits."""
    if descriptors is None:
        return np.zeros((0, 256 if name == "orb" else 128), np.float32)
    if name == "orb":
        return np.unpackbits(descriptors, axis=1).astype(np.float32)
    return descriptors.astype(np.float32)


def keypoints_of(gray: np.ndarray, name: str, max_keypoints: int) -> Keypoints:
    """The strongest keypoints of a gray image (strongest first; ties by position)."""
    found, descriptors = detector(name, max_keypoints).detectAndCompute(gray, None)
    values = descriptor_values(descriptors, name)
    if not found:
        return Keypoints(np.zeros((0, 3), np.float32), values)
    height, width = gray.shape
    raw = np.array([(k.pt[0], k.pt[1], k.size, k.response) for k in found], np.float64)
    order = np.lexsort((raw[:, 1], raw[:, 0], -raw[:, 3]))[:max_keypoints]
    places = np.column_stack(
        [raw[order, 0] / width, raw[order, 1] / height, raw[order, 2] / max(width, height)]
    ).astype(np.float32)
    return Keypoints(places, values[order])


def image_keypoints(path: Path, params: WordsParams) -> Keypoints | str:
    """An original's keypoints, or why it could not be read."""
    try:
        gray = gray_image(path.read_bytes(), params.side)
    except Exception as error:  # any decoder's failure: the image gets no words
        return f"{path}: cannot be decoded ({type(error).__name__}: {error})"
    return keypoints_of(gray, params.detector, params.max_keypoints)


def keypoints_task(task: tuple[list[Path], WordsParams]) -> list[Keypoints | str]:
    """Keypoints of a few images (a task for a process)."""
    paths, params = task
    return [image_keypoints(path, params) for path in paths]


def words_task(
    task: tuple[list[Path], WordsParams, np.ndarray],
) -> list[tuple[np.ndarray, np.ndarray] | str]:
    """Places and words of a few images' keypoints (a task for a process)."""
    paths, params, centers = task
    result: list[tuple[np.ndarray, np.ndarray] | str] = []
    for found in keypoints_task((paths, params)):
        if isinstance(found, str):
            result.append(found)
        else:
            result.append((found.places, nearest_words(found.descriptors, centers)))
    return result


def chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# ----------------------------------------------------------------------------- vocabulary


def fit_vocabulary(descriptors: np.ndarray, words: int, seed: int) -> np.ndarray:
    """`words` centers of the descriptors (MiniBatchKMeans, seeded), float32."""
    from sklearn.cluster import MiniBatchKMeans

    if len(descriptors) < words:
        raise common.UserError(
            f"words.vocabulary = {words} is more than the {len(descriptors)} descriptors of "
            "the sample: lower it, or raise words.vocabulary_images or words.max_keypoints"
        )
    model = MiniBatchKMeans(
        n_clusters=words, random_state=seed, batch_size=4096, n_init=1, max_no_improvement=20
    )
    model.fit(descriptors.astype(np.float32))
    return model.cluster_centers_.astype(np.float32)


def nearest_words(descriptors: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Each descriptor's nearest center (int32)."""
    if len(descriptors) == 0:
        return np.zeros(0, np.int32)
    squared = (centers.astype(np.float64) ** 2).sum(axis=1)[None, :]
    distances = squared - 2.0 * descriptors.astype(np.float64) @ centers.T.astype(np.float64)
    return distances.argmin(axis=1).astype(np.int32)


def sample_descriptors(found: list[Keypoints], limit: int, seed: int) -> np.ndarray:
    """The sample's descriptors, at most `limit` (a seeded choice beyond)."""
    rows = [keypoints.descriptors for keypoints in found if len(keypoints.descriptors)]
    if not rows:
        return np.zeros((0, 1), np.float32)
    stacked = np.concatenate(rows)
    if len(stacked) <= limit:
        return stacked
    chosen = np.random.default_rng(seed).choice(len(stacked), limit, replace=False)
    return stacked[np.sort(chosen)]


# ----------------------------------------------------------------------------- tables


def words_table(ids: list[str], blobs: list[bytes]) -> pd.DataFrame:
    """One row per keypoint: id, word, x, y, size, from each image's packed keypoints
    (images in the given order), unpacked all at once."""
    counts = np.array([len(blob) // KEYPOINT_BYTES for blob in blobs], np.int64)
    rows = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, 4)
    return pd.DataFrame(
        {
            "id": common.taken_strings(ids, np.repeat(np.arange(len(ids)), counts)),
            "word": rows[:, 0].astype(np.int32),
            "x": rows[:, 1],
            "y": rows[:, 2],
            "size": rows[:, 3],
        }
    )


def words_metrics(parts: list[Path], images_read: int, failed: int, words: int) -> dict:
    """Counts for metrics/words.json, from the parts' metadata and their word column."""
    files = [pq.ParquetFile(part) for part in parts]
    keypoints = sum(file.metadata.num_rows for file in files)
    with_keypoints = sum(int(common.parquet_keys(part, "words")["images"]) for part in parts)
    used = np.zeros(max(words, 1), bool)
    for file in files:
        used[file.read(columns=["word"]).column(0).to_numpy()] = True
    return {
        "images": images_read,
        "images_with_keypoints": with_keypoints,
        "unreadable_images": failed,
        "keypoints": keypoints,
        "keypoints_per_image": round(float(keypoints / max(images_read, 1)), 2),
        "vocabulary": words,
        "words_used": int(used.sum()),
    }


# ----------------------------------------------------------------------------- run


def sample_rows(table: pd.DataFrame, params: WordsParams) -> np.ndarray:
    """The rows of the images whose descriptors the vocabulary is fitted on (by sha256)."""
    return np.sort(
        common.content_sample(table["sha256"].tolist(), params.vocabulary_images, params.seed)
    )


def vocabulary_of(
    table: pd.DataFrame, collection_dir: Path, params: WordsParams, workers: int
) -> tuple[np.ndarray, list[str]]:
    """The vocabulary's centers, fitted on the sample of `table`'s images (id, path,
    sha256), and the messages of the files that could not be read."""
    paths = [collection_dir / path for path in table["path"]]
    rows = sample_rows(table, params).tolist()
    if params.detector == "encoder":
        from stages import encoder_cells  # Keras loads only for this detector

        found = encoder_cells.table_keypoints(table, rows, params.max_keypoints)
    else:
        tasks = [([paths[row] for row in block], params) for block in chunks(rows, TASK_IMAGES)]
        batches = common.map_in_processes(keypoints_task, tasks, workers)
        found = [kp for batch in batches for kp in batch]
    failed = [kp for kp in found if isinstance(kp, str)]
    usable = [kp for kp in found if not isinstance(kp, str)]
    descriptors = sample_descriptors(usable, MAX_SAMPLE_DESCRIPTORS, params.seed)
    return fit_vocabulary(descriptors, params.vocabulary, params.seed), failed


def packed(places: np.ndarray, words: np.ndarray) -> bytes:
    """An image's keypoints as bytes: rows of word, x, y, size (float32)."""
    return np.column_stack([words.astype(np.float32), places]).astype(np.float32).tobytes()


def placed_words(
    table: pd.DataFrame,
    rows: np.ndarray,
    params: WordsParams,
    centers: np.ndarray,
    collection_dir: Path,
    workers: int,
) -> list[tuple[np.ndarray, np.ndarray] | str]:
    """The places and words of the keypoints of `table`'s given rows (or why an image
    could not be read): from the originals in processes, or from the encoder's cells."""
    if len(rows) == 0:
        return []
    if params.detector == "encoder":
        from stages import encoder_cells  # Keras loads only for this detector

        found = encoder_cells.table_keypoints(table, rows.tolist(), params.max_keypoints)
        return [(kp.places, nearest_words(kp.descriptors, centers)) for kp in found]
    paths = table["path"].tolist()  # joined to the folder for the rows read alone
    blocks = chunks(rows.tolist(), TASK_IMAGES)
    tasks = [([collection_dir / paths[row] for row in block], params, centers) for block in blocks]
    batches = common.map_in_processes(words_task, tasks, workers)
    return [result for batch in batches for result in batch]


def new_words(
    table: pd.DataFrame,
    collection_dir: Path,
    params: WordsParams,
    centers: np.ndarray,
    workers: int,
    cache: ContentCache | None = None,
) -> tuple[dict[str, bytes], list[str]]:
    """The packed keypoints of `table`'s images (id, path, sha256) that `cache` lacks
    (every image without a cache), by sha256, added to the cache; and the messages of the
    files that could not be read (not cached: named again until the file is fixed)."""
    sha256s = table["sha256"].tolist()
    _, rows = cache.missing_rows(sha256s) if cache else (sha256s, np.arange(len(table)))
    found: dict[str, bytes] = {}
    failed: list[str] = []
    for row, result in zip(
        rows.tolist(),
        placed_words(table, rows, params, centers, collection_dir, workers),
        strict=True,
    ):
        if isinstance(result, str):
            failed.append(result)
        else:
            found[sha256s[row]] = packed(*result)
    if cache is not None and found:
        with cache.new_segment(list(found), {}) as segment:
            segment.append_blobs("keypoints", list(found.values()))
    return found, failed


def words_of(
    table: pd.DataFrame,
    collection_dir: Path,
    params: WordsParams,
    centers: np.ndarray,
    workers: int,
    cache: ContentCache | None = None,
) -> tuple[pd.DataFrame, list[str], int]:
    """The words table of `table`'s images (id, path, sha256), the messages of the files
    that could not be read, and how many images were read (those `cache` lacks)."""
    found, failed = new_words(table, collection_dir, params, centers, workers, cache)
    shas = table["sha256"].tolist()
    blobs = {**cache.held_blobs(shas, "keypoints", BLOCK), **found} if cache else found
    return table_of(table, blobs), failed, len(found) + len(failed)


def table_of(table: pd.DataFrame, blobs: dict[str, bytes]) -> pd.DataFrame:
    """The words table of `table`'s images (id, sha256) that have packed keypoints in
    `blobs` (an unreadable image has none)."""
    kept = [row for row, sha in enumerate(table["sha256"].tolist()) if sha in blobs]
    ids, sha256s = table["id"].tolist(), table["sha256"].tolist()
    return words_table([ids[row] for row in kept], [blobs[sha256s[row]] for row in kept])


def find_words(
    table: pd.DataFrame, collection_dir: Path, params: WordsParams, workers: int
) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """The vocabulary, the words table and the unreadable files' messages of `table`'s
    images (id, path, sha256): both stages' work at once, with no cache."""
    centers, failed = vocabulary_of(table, collection_dir, params, workers)
    words, unread, _ = words_of(table, collection_dir, params, centers, workers)
    return centers, words, sorted(set(failed) | set(unread))


def read_vocabulary(params: WordsParams, path: Path = VOCABULARY_FILE) -> np.ndarray:
    """The vocabulary's centers, checked to come from the detector the params name."""
    if not path.exists():
        raise common.UserError(f"{path} is missing: run `dvc repro vocabulary` first")
    with np.load(path) as stored:
        centers, made_with = stored["centers"], json.loads(str(stored["params"]))
    wanted = detector_params(params)
    if made_with != wanted:
        raise common.UserError(
            f"{path} was made with {made_with}, the params say {wanted}: run "
            "`dvc unfreeze vocabulary && dvc repro vocabulary`"
        )
    return centers


def detector_params(params: WordsParams) -> dict[str, int | str]:
    """What a keypoint's word depends on besides the vocabulary's centers (for encoder
    cells, also the encoder file and the pixels' decode settings)."""
    made_with: dict[str, int | str] = {
        "detector": params.detector,
        "side": params.side,
        "max_keypoints": params.max_keypoints,
    }
    if params.detector == "encoder":
        from stages import encoder_cells  # Keras loads only for this detector

        made_with.update(encoder_cells.detector_key())
    return made_with


def words_key(params: WordsParams) -> str:
    """What an image's words depend on besides its file: the vocabulary file's hash and
    the detector's params (the name of the cache folder, and of embed's bags of words)."""
    key = hashlib.sha256(json.dumps(detector_params(params), sort_keys=True).encode())
    return f"{file_key(VOCABULARY_FILE)}-{key.hexdigest()[:12]}"


def part_key(words_key: str, ids: list[str], sha256s: list[str]) -> str:
    """What a part's bytes depend on: the words' key and its images' ids and files."""
    digest = hashlib.sha256(words_key.encode())
    for image_id, sha in zip(ids, sha256s, strict=True):
        digest.update(f"\n{image_id} {sha}".encode())
    return digest.hexdigest()[:32]


def stored_part_key(path: Path) -> str:
    """The key a part file was written with ('' for none, or a file that cannot be read)."""
    try:
        return common.parquet_keys(path, "words").get("part_key", "")
    except (OSError, ValueError, common.UserError):
        return ""


def write_parts(
    table: pd.DataFrame,
    keys: dict[str, str],
    blobs_of: Callable[[list[str]], dict[str, bytes]],
    renew: set[str],
    folder: Path = WORDS_DIR,
) -> int:
    """Write the words of `table`'s images (id, sha256) into `folder` as parts of
    PART_IMAGES images each, in order, with `keys` in each part's metadata. A part whose
    file already holds its images' words (its key matches) and has no image of `renew`
    is kept as it is: a run with new images at the end of the collection writes its last
    parts alone, and DVC hashes only those again. `blobs_of` gives the packed keypoints of
    some sha256s. Parts beyond the last are removed. Returns how many parts were written."""
    folder.mkdir(parents=True, exist_ok=True)
    ids, sha256s = table["id"].tolist(), table["sha256"].tolist()
    starts = range(0, max(len(table), 1), PART_IMAGES)
    written = 0
    for number, start in enumerate(starts):
        rows = slice(start, start + PART_IMAGES)
        key = part_key(keys["words_key"], ids[rows], sha256s[rows])
        path = folder / f"part-{number:05d}.parquet"
        if stored_part_key(path) == key and not renew.intersection(sha256s[rows]):
            continue
        part = table_of(table.iloc[rows], blobs_of(sha256s[rows]))
        images_held = str(part["id"].nunique())
        common.write_parquet(part, path, keys={**keys, "part_key": key, "images": images_held})
        written += 1
    for stale in common.words_parts(folder)[len(starts) :]:
        stale.unlink()
    return written


def main() -> None:
    """Read the manifest, the vocabulary and the originals the cache lacks; write the
    parts of the words that changed, and metrics."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = WordsParams.from_params(settings.load_params())
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    table = common.distinct_images(manifest)
    centers = read_vocabulary(params)
    folder = CACHE_DIR / words_key(params)
    cache = ContentCache(folder, arrays=(), blobs=("keypoints",))
    found, failed = new_words(
        table, common.COLLECTION_DIR, params, centers, common.worker_count(), cache
    )
    for message in failed:
        logger.warning("%s; it has no words", message)
    # What made the words, for the readers' caches (embed's bags of words).
    keys = {"words_key": folder.name, "vocabulary": str(len(centers))}
    unreadable = set(table["sha256"].tolist()) - set(cache.index["sha256"].tolist())
    written = write_parts(
        table,
        keys,
        lambda shas: cache.held_blobs(shas, "keypoints", BLOCK),
        set(found) | unreadable,
    )
    parts = common.words_parts(WORDS_DIR)
    metrics = words_metrics(parts, len(table), len(failed), len(centers))
    common.write_json(metrics, WORDS_METRICS_FILE)
    logger.info(
        "%d images (%s): %d keypoints (%.1f an image) in %d of %d %s words; %d unreadable; "
        "%d of %d parts written; %.1f s",
        len(table),
        common.searched_words(len(found) + len(failed), len(table), "read"),
        metrics["keypoints"],
        metrics["keypoints_per_image"],
        metrics["words_used"],
        len(centers),
        params.detector,
        len(failed),
        written,
        len(parts),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
