"""patterns: which images hold each visual pattern the mine stage found, and the reports.

Params:  PatternsParams in stages/pattern_model.py (params.yaml, section patterns:
         min_share, reported, mosaic_side)
Inputs:  models/patterns.parquet (the mined patterns), data/processed/words/,
         data/raw/manifest.parquet, data/interim/thumbs/ (for the mosaics)
Outputs: data/processed/patterns.parquet (pattern, words, word_count, support: how many
         images hold it now), data/processed/image_patterns.parquet (id, pattern, score:
         the share of the pattern's word weight the image holds, for every image holding
         at least min_share), metrics/patterns.json (counts), reports/patterns/
         (patterns.csv ranked by support; pattern-NNN.png for the first `reported`: its
         best images, each with the pattern's keypoints drawn)

An image's patterns depend on its words and the model alone, so data/cache/patterns/
keeps them by the file's sha256 (for this model file, words and min_share): with
`dvc freeze mine` a run reads the words of its new images only. The mosaics are kept by
a key of what they show (data/cache/patterns/mosaics/), so one is drawn again only when
its best images change.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from stages import common, mosaics, pattern_model, settings, thumbnails
from stages.content_cache import ContentCache, file_key
from stages.pattern_model import PatternsParams

STAGE = "patterns"
PATTERNS_FILE = common.PROCESSED_DIR / "patterns.parquet"
IMAGE_PATTERNS_FILE = common.IMAGE_PATTERNS_FILE
PATTERNS_METRICS_FILE = common.METRICS_DIR / "patterns.json"
CACHE_DIR = common.CACHE_DIR / "patterns"  # each image's patterns, by file sha256
MOSAIC_CACHE_DIR = CACHE_DIR / "mosaics"  # this run's mosaics, by key
REPORT_DIR = Path("reports/patterns")
BLOCK = 4096  # cached images read at once


# ----------------------------------------------------------------------------- holders


def packed(patterns: np.ndarray, scores: np.ndarray) -> bytes:
    """An image's patterns as bytes: the pattern numbers (int32), then the scores
    (float32, as the output stores them)."""
    return np.asarray(patterns, "<i4").tobytes() + np.asarray(scores, "<f4").tobytes()


def unpacked(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(patterns, scores) of packed patterns."""
    count = len(blob) // 8
    return np.frombuffer(blob, "<i4", count), np.frombuffer(blob, "<f4", count, 4 * count)


def held_patterns(
    table: pd.DataFrame, ids: list[str], model: pd.DataFrame, min_share: float
) -> list[bytes]:
    """Each image's patterns (packed, in `ids` order) from the words table of its
    keypoints (id, word): an image without words holds none."""
    row = pattern_model.image_rows(table["id"], ids)
    table = table[row >= 0].assign(row=row[row >= 0])
    weights = pattern_model.image_word_weights(table, "frequency")  # presence alone counts
    words = [np.asarray(w, np.int64) for w in model["words"]]
    largest = max([int(table["word"].max()) if len(table) else 0, *[int(w.max()) for w in words]])
    presence = pattern_model.presence_matrix(weights, len(ids), largest + 1)
    weights_of = [np.asarray(w, np.float64) for w in model["weights"]]
    found = pattern_model.pattern_holders(presence, words, weights_of, min_share)
    numbers = model["pattern"].to_numpy(np.int32)[found["column"].to_numpy()]
    scores = found["score"].to_numpy()
    bounds = np.searchsorted(found["row"].to_numpy(), np.arange(len(ids) + 1))
    return [packed(numbers[a:b], scores[a:b]) for a, b in itertools.pairwise(bounds)]


def holders_key(model_file: Path, words_key: str, min_share: float) -> str:
    """The cache folder's name: what an image's patterns depend on besides its words."""
    made_with = f"{file_key(model_file)} {words_key} {min_share!r}"
    return hashlib.sha256(made_with.encode()).hexdigest()[:16]


def cached_holders(
    images: pd.DataFrame,
    model: pd.DataFrame,
    min_share: float,
    cache: ContentCache,
    words_dir: Path = common.WORDS_DIR,
) -> tuple[pd.DataFrame, int]:
    """The image_patterns table of `images` (id, sha256; distinct files), and how many
    images were looked at: those `cache` lacks, whose words alone are read."""
    ids, sha256s = images["id"].tolist(), images["sha256"].tolist()
    missing, rows = cache.missing_rows(sha256s)
    found: dict[str, bytes] = {}
    if missing:
        new_ids = [ids[row] for row in rows.tolist()]
        everything = len(missing) == len(sha256s)
        table = common.read_words_table(
            words_dir, columns=["id", "word"], ids=None if everything else new_ids
        )
        found = dict(zip(missing, held_patterns(table, new_ids, model, min_share), strict=True))
        with cache.new_segment(missing, {}) as segment:
            segment.append_blobs("held", list(found.values()))
    known = [sha for sha in sha256s if sha not in found]
    blobs = {**cache.held_blobs(known, "held", BLOCK), **found}
    held = [unpacked(blobs[sha]) for sha in sha256s]
    counts = np.array([len(patterns) for patterns, _ in held], np.int64)
    table = pattern_model.image_patterns_table(
        ids,
        np.repeat(np.arange(len(ids)), counts),
        np.concatenate([p for p, _ in held]) if held else np.zeros(0, np.int32),
        np.concatenate([s for _, s in held]) if held else np.zeros(0, np.float32),
    )
    return table, len(missing)


def patterns_table(model: pd.DataFrame, image_patterns: pd.DataFrame) -> pd.DataFrame:
    """The patterns output: pattern, words, word_count and support (the images holding
    it now), by pattern number."""
    support = image_patterns["pattern"].value_counts()
    return pd.DataFrame(
        {
            "pattern": model["pattern"].to_numpy(np.int32),
            "words": [list(map(int, w)) for w in model["words"]],
            "word_count": model["word_count"].to_numpy(np.int32),
            "support": model["pattern"].map(support).fillna(0).to_numpy(np.int32),
        }
    )


# ----------------------------------------------------------------------------- reports


def marked_thumbnail(thumb: np.ndarray, keypoints: pd.DataFrame) -> np.ndarray:
    """A thumbnail with keypoints (x, y as shares, size as a share of the long side)
    drawn as circles."""
    image = Image.fromarray(thumb)
    draw = ImageDraw.Draw(image)
    height, width = thumb.shape[:2]
    for x, y, size in keypoints[["x", "y", "size"]].itertuples(index=False):
        radius = max(2.0, size * max(width, height) / 2)
        cx, cy = x * width, y * height
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=(255, 204, 51))
    return np.asarray(image)


def pattern_mosaic(
    members: list[int],
    best: list[str],
    keypoints_of: dict[str, pd.DataFrame],
    thumbs: thumbnails.Thumbnails,
    row_of: dict[str, int],
    side: int,
) -> Image.Image:
    """A pattern's `best` images (highest score first), its keypoints drawn on each
    (`keypoints_of` holds each image's rows of the words table)."""
    pictures = []
    for image_id in best:
        points = keypoints_of[image_id]
        points = points[np.isin(points["word"].to_numpy(), members)]
        pictures.append(marked_thumbnail(thumbs[row_of[image_id]], points))
    return mosaics.mosaic(np.stack(pictures), side)


def mosaic_key(
    words: list[int], best: list[str], sha256_of: dict[str, str], thumbs_key: str, made_with: str
) -> str:
    """What a pattern's mosaic depends on: its words, its best images' files (in order),
    the thumbnails' key and `made_with` (the words' key, the side and the drawing code)."""
    digest = hashlib.sha256(f"{made_with} {thumbs_key} {words}".encode())
    for image_id in best:
        digest.update(sha256_of[image_id].encode())
    return digest.hexdigest()[:32]


def first_of_each(values: np.ndarray, count: int) -> np.ndarray:
    """Whether each row is among the first `count` rows of its value, in row order (as
    pandas' groupby(...).head(count), which took half a second for 2.4 million rows)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]][: len(values)])
    rank = np.arange(len(values)) - np.repeat(starts, np.diff(np.r_[starts, len(values)]))
    chosen = np.zeros(len(values), bool)
    chosen[order[rank < count]] = True
    return chosen


def write_reports(
    patterns: pd.DataFrame,
    image_patterns: pd.DataFrame,
    sha256_of: dict[str, str],
    words_key: str,
    params: PatternsParams,
    thumbs_file: Path,
) -> tuple[int, int]:
    """reports/patterns/: patterns.csv and the mosaics of the `reported` patterns most
    held. A mosaic kept in MOSAIC_CACHE_DIR under its key is copied, not drawn; the words
    of the images the others show are read from the words table. Returns how many
    mosaics were kept, and how many there are."""
    ranked = patterns.sort_values(["support", "pattern"], ascending=[False, True], kind="stable")
    summary = ranked.assign(words=[" ".join(map(str, w)) for w in ranked["words"]])
    # The first five first: a join per group of millions of rows took a second.
    first_five = image_patterns[first_of_each(image_patterns["pattern"].to_numpy(), 5)]
    best_five = first_five.groupby("pattern")["id"].agg(" ".join)
    summary["best_images"] = summary["pattern"].map(best_five).fillna("")
    reported = ranked[ranked["support"] > 0].head(params.reported)
    thumbs = thumbnails.Thumbnails(thumbs_file)
    row_of = {image_id: row for row, image_id in enumerate(thumbs.ids())}
    shown = image_patterns[
        common.is_among(image_patterns["pattern"], reported["pattern"])
        & common.is_among(image_patterns["id"], row_of)
    ]
    best = shown.groupby("pattern", sort=False)["id"].apply(
        lambda ids: ids.head(params.mosaic_side**2).tolist()
    )
    code = hashlib.sha256(Path(__file__).read_bytes() + Path(mosaics.__file__).read_bytes())
    made_with = f"{code.hexdigest()} {words_key} {params.mosaic_side}"
    words_of = {
        int(n): list(words)
        for n, words in zip(reported["pattern"], reported["words"], strict=True)
        if n in best.index
    }
    keys = {
        n: mosaic_key(words, best[n], sha256_of, thumbs.key, made_with)
        for n, words in words_of.items()
    }
    kept = mosaics.kept_mosaics(keys, MOSAIC_CACHE_DIR) if thumbs.key else {}
    drawn = [n for n in keys if n not in kept]
    # The keypoints of the images the new mosaics show, from one read of the words table.
    chosen = sorted({image_id for n in drawn for image_id in best[n]})
    table = common.read_words_table(ids=chosen) if chosen else None
    keypoints_of = dict(tuple(table.groupby("id", sort=False, observed=True))) if chosen else {}
    name = {n: f"pattern-{n:03d}.png" for n in keys}
    pictures = {
        Path(name[n]): pattern_mosaic(
            words_of[n],
            best[n],
            keypoints_of,
            thumbs,
            row_of,
            params.mosaic_side,
        )
        for n in drawn
    }
    with common.replace_folder(REPORT_DIR) as staging:
        common.write_csv(summary, staging / "patterns.csv")
        mosaics.save_pngs(
            {staging / path: picture for path, picture in pictures.items()},
            common.worker_count(),
        )
        for n, path in kept.items():
            shutil.copyfile(path, staging / name[n])
    if thumbs.key:
        mosaics.keep_mosaics({n: REPORT_DIR / name[n] for n in keys}, keys, MOSAIC_CACHE_DIR)
    return len(kept), len(keys)


def patterns_metrics(patterns: pd.DataFrame, image_patterns: pd.DataFrame, images: int) -> dict:
    """Counts for metrics/patterns.json."""
    held = patterns[patterns["support"] > 0]
    return {
        "images": images,
        "patterns": len(patterns),
        "images_with_a_pattern": int(image_patterns["id"].nunique()),
        "largest_support": int(held["support"].max()) if len(held) else 0,
        "mean_words_per_pattern": round(float(patterns["word_count"].mean()), 2)
        if len(patterns)
        else 0.0,
    }


def main() -> None:
    """Read the mined patterns and the words of images not seen with them; write each
    image's patterns, the patterns' support, metrics and reports."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = PatternsParams.from_params(settings.load_params())
    words_key = common.parquet_keys(common.WORDS_DIR, made_by="words").get("words_key", "")
    model = pattern_model.read_model(words_key)
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    images = common.distinct_images(manifest)
    key = holders_key(pattern_model.MODEL_FILE, words_key, params.min_share)
    cache = ContentCache(CACHE_DIR / key, arrays=(), blobs=("held",))
    image_patterns, looked_at = cached_holders(images, model, params.min_share, cache)
    patterns = patterns_table(model, image_patterns)
    common.write_parquet(patterns, PATTERNS_FILE)
    common.write_parquet(image_patterns, IMAGE_PATTERNS_FILE)
    metrics = patterns_metrics(patterns, image_patterns, len(images))
    common.write_json(metrics, PATTERNS_METRICS_FILE)
    sha256_of = dict(zip(images["id"].tolist(), images["sha256"].tolist(), strict=True))
    kept, reported = write_reports(
        patterns, image_patterns, sha256_of, words_key, params, thumbnails.THUMBS_DIR
    )
    logger.info(
        "%d images (%s): %d patterns held by %d images (the largest by %d); "
        "%d of %d mosaics kept from the last run; %.1f s",
        len(images),
        common.searched_words(looked_at, len(images), "looked at"),
        len(patterns),
        metrics["images_with_a_pattern"],
        metrics["largest_support"],
        kept,
        reported,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
