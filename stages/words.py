"""words: local features of every image, a visual vocabulary, and each image as visual words.

Params:  WordsParams below (params.yaml, section words)
Inputs:  data/raw/manifest.parquet (id, path, sha256, width, height, duplicate),
         data/raw/collections/ (the originals)
Outputs: models/vocabulary.npz (the words' centers, and the detector that made them),
         data/processed/words.parquet (one row per kept keypoint: id, word, x, y, size;
         x and y are shares of the image's width and height, size a share of its long
         side, so they map onto any thumbnail), metrics/words.json (counts)

Each image is decoded upright, turned gray and scaled so that its long side is `side`
px (a small one enlarged at most MAX_UPSCALE times: SIFT finds little in a 32 px
image). The detector (`sift`, as minIA used, or `orb`, several times faster) keeps the
`max_keypoints` strongest keypoints.
The vocabulary is MiniBatchKMeans of the descriptors of a sample of images chosen by
their files' sha256 (so it does not depend on the order of arrival); every keypoint is
then the word of its nearest center. ORB's binary descriptors are clustered as their
256 bits. Exact copies (sync's `duplicate` flag) are left out: they would only repeat
their original's words. A file that cannot be decoded is named in a warning and has no
words; the run goes on.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field

from stages import common, images, settings

STAGE = "words"
VOCABULARY_FILE = Path("models/vocabulary.npz")
WORDS_FILE = common.PROCESSED_DIR / "words.parquet"
WORDS_METRICS_FILE = common.METRICS_DIR / "words.json"
WORD_COLUMNS = ["id", "word", "x", "y", "size"]
MAX_SAMPLE_DESCRIPTORS = 250_000  # the vocabulary's fit sees at most this many
TASK_IMAGES = 16  # images a worker detects in one task
MAX_UPSCALE = 4  # a small image is enlarged at most this much towards `side`


class WordsParams(settings.Section):
    """params.yaml, section words."""

    SECTION: ClassVar[str] = "words"
    detector: Literal["sift", "orb"] = Field(
        "sift", description="local features: sift (as minIA) or orb (several times faster)"
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


NO_KEYPOINTS = Keypoints(np.zeros((0, 3), np.float32), np.zeros((0, 0), np.float32))


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


def chunks(items: list[Path], size: int) -> list[list[Path]]:
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


def words_table(ids: list[str], placed: list[tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """One row per keypoint: id, word, x, y, size (images in the given order)."""
    counts = [len(words) for _, words in placed]
    places = np.concatenate([p for p, _ in placed]) if placed else np.zeros((0, 3), np.float32)
    words = np.concatenate([w for _, w in placed]) if placed else np.zeros(0, np.int32)
    return pd.DataFrame(
        {
            "id": pd.Series(np.repeat(np.array(ids, dtype=object), counts), dtype="str"),
            "word": words.astype(np.int32),
            "x": places[:, 0],
            "y": places[:, 1],
            "size": places[:, 2],
        }
    )


def words_metrics(table: pd.DataFrame, images_read: int, failed: int, words: int) -> dict:
    """Counts for metrics/words.json."""
    per_image = table.groupby("id").size()
    return {
        "images": images_read,
        "images_with_keypoints": len(per_image),
        "unreadable_images": failed,
        "keypoints": len(table),
        "keypoints_per_image": round(float(len(table) / max(images_read, 1)), 2),
        "vocabulary": words,
        "words_used": int(table["word"].nunique()),
    }


# ----------------------------------------------------------------------------- run


def collection_images(manifest: pd.DataFrame) -> pd.DataFrame:
    """The images whose words are found: all but exact copies, in manifest order."""
    keep = ~manifest["duplicate"].fillna(False).astype(bool)
    return manifest.loc[keep, ["id", "path", "sha256"]].reset_index(drop=True)


def find_words(
    table: pd.DataFrame, collection_dir: Path, params: WordsParams, workers: int
) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """The vocabulary, the words table and the unreadable files' messages of `table`'s
    images (id, path, sha256)."""
    paths = [collection_dir / path for path in table["path"]]
    sha256s = table["sha256"].tolist()
    sample = np.sort(common.content_sample(sha256s, params.vocabulary_images, params.seed))
    in_sample = set(sample.tolist())
    tasks = [([paths[row] for row in block], params) for block in chunks(list(sample), TASK_IMAGES)]
    found_sample = [
        kp for batch in common.map_in_processes(keypoints_task, tasks, workers) for kp in batch
    ]
    failed = [kp for kp in found_sample if isinstance(kp, str)]
    usable = [kp for kp in found_sample if not isinstance(kp, str)]
    descriptors = sample_descriptors(usable, MAX_SAMPLE_DESCRIPTORS, params.seed)
    centers = fit_vocabulary(descriptors, params.vocabulary, params.seed)

    placed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for row, kp in zip(sample.tolist(), found_sample, strict=True):
        if not isinstance(kp, str):
            placed[row] = (kp.places, nearest_words(kp.descriptors, centers))
    rest = [row for row in range(len(paths)) if row not in in_sample]
    blocks = chunks(rest, TASK_IMAGES)
    tasks = [([paths[row] for row in block], params, centers) for block in blocks]
    results = common.map_in_processes(words_task, tasks, workers)
    for block, batch in zip(blocks, results, strict=True):
        for row, result in zip(block, batch, strict=True):
            if isinstance(result, str):
                failed.append(result)
            else:
                placed[row] = result
    rows = sorted(placed)
    ids = table["id"].tolist()
    words = words_table([ids[row] for row in rows], [placed[row] for row in rows])
    return centers, words, failed


def main() -> None:
    """Read the manifest and the originals; write the vocabulary, the words and metrics."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = WordsParams.from_params(settings.load_params())
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    table = collection_images(manifest)
    centers, words, failed = find_words(table, common.COLLECTION_DIR, params, common.worker_count())
    for message in failed:
        logger.warning("%s; it has no words", message)
    VOCABULARY_FILE.parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_output(VOCABULARY_FILE) as temporary, open(temporary, "wb") as file:
        np.savez(file, centers=centers, detector=np.array(params.detector))
    common.write_parquet(words, WORDS_FILE)
    metrics = words_metrics(words, len(table), len(failed), len(centers))
    common.write_json(metrics, WORDS_METRICS_FILE)
    logger.info(
        "%d images: %d keypoints (%.1f an image) in %d of %d %s words; %d unreadable; %.1f s",
        len(table),
        metrics["keypoints"],
        metrics["keypoints_per_image"],
        metrics["words_used"],
        len(centers),
        params.detector,
        len(failed),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
