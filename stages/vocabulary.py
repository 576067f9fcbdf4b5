"""vocabulary: the visual words, fitted once on a sample of the collection's local features.

Params:  WordsParams (params.yaml, section words; see stages/words.py)
Inputs:  data/raw/manifest.parquet (id, path, sha256, duplicate),
         data/raw/collections/ (the originals of the sample)
Outputs: models/vocabulary.npz (centers: the words, float32; params: the detector's
         params they were made with, as JSON)

The sample is `words.vocabulary_images` images chosen by their files' sha256 (not by
arrival), their keypoints found as the words stage finds them; the vocabulary is
MiniBatchKMeans of at most MAX_SAMPLE_DESCRIPTORS of their descriptors, seeded. Like
train and cluster, it is fitted once: `dvc freeze vocabulary` keeps it while new images
arrive, and the words stage then reads only the new ones.
"""

from __future__ import annotations

import json
import time

import numpy as np

from stages import common, settings, words

STAGE = "vocabulary"


def main() -> None:
    """Fit the vocabulary on the sample; write it with the params it was made with."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = words.WordsParams.from_params(settings.load_params())
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    table = common.distinct_images(manifest)
    centers, failed = words.vocabulary_of(
        table, common.COLLECTION_DIR, params, common.worker_count()
    )
    for message in failed:
        logger.warning("%s; it is left out of the sample", message)
    words.VOCABULARY_FILE.parent.mkdir(parents=True, exist_ok=True)
    made_with = json.dumps(words.detector_params(params), sort_keys=True)
    with (
        common.atomic_output(words.VOCABULARY_FILE) as temporary,
        open(temporary, "wb") as file,
    ):
        np.savez(file, centers=centers, params=np.array(made_with))
    logger.info(
        "%d words (%s) from %d sample images; %.1f s",
        len(centers),
        params.detector,
        min(len(table), params.vocabulary_images),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
