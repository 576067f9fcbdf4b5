"""Descriptors: bags of visual words (TF-IDF) in place of the latent vectors, and the
scaling and PCA every encoder's vectors may go through."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import folder_bytes, pattern_image
from PIL import Image

from stages import common, describe, descriptors, embed, similar, train, words

VOCABULARY = 6


def keypoint_table(bags: dict[str, list[int]]) -> pd.DataFrame:
    """A words table (id, word) with one row per keypoint of each id's bag."""
    rows = [(image, word) for image, bag in bags.items() for word in bag]
    return pd.DataFrame(rows, columns=["id", "word"]).astype({"word": np.int32})


BAGS = {
    "a": [0, 0, 1, 2],
    "b": [1, 2, 2, 3],
    "c": [0, 4, 4, 4],
    "d": [5, 1],
}


# ----------------------------------------------------------------------------- bags of words


def test_counts_follow_the_files_so_a_copy_shares_its_originals_bag() -> None:
    table = keypoint_table({**BAGS, "elsewhere": [3, 3]})
    key_of = pd.Series({"a": "sha-a", "a-copy": "sha-a", "b": "sha-b", "blank": "sha-blank"})
    counts = descriptors.word_counts(table, ["sha-b", "sha-a", "sha-blank"], key_of, VOCABULARY)
    dense = counts.toarray()
    np.testing.assert_array_equal(dense[0], [0, 1, 2, 1, 0, 0])
    np.testing.assert_array_equal(dense[1], [2, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(dense[2], np.zeros(VOCABULARY)), "no words: a row of zeros"


def test_tf_idf_rows_have_unit_length_and_rare_words_weigh_most() -> None:
    keys = list(BAGS)
    counts = descriptors.word_counts(
        keypoint_table(BAGS), keys, pd.Series(keys, index=keys), VOCABULARY
    )
    idf = descriptors.inverse_document_frequency(counts)
    # Word 1 is in three of four images, word 3 in one: the rarer weighs more.
    assert idf[3] > idf[1] > 0
    assert np.isfinite(idf).all()
    vectors = descriptors.tf_idf(counts, idf)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    # Image b holds words 1, 2, 2, 3: word 2 twice, so twice word 1's weight times idf.
    b = vectors[1]
    assert b[2] / b[3] == pytest.approx(2 * idf[2] / idf[3], rel=1e-5)
    empty = descriptors.word_counts(keypoint_table({}), ["x"], pd.Series(dtype=str), VOCABULARY)
    assert (descriptors.tf_idf(empty, idf) == 0).all(), "an empty bag stays zero, not NaN"


# ----------------------------------------------------------------------------- preprocessing


def test_minmax_and_standard_scaling_are_fitted_on_one_sample_and_applied_to_others() -> None:
    rng = np.random.default_rng(0)
    sample = rng.normal([5.0, -2.0, 0.0], [3.0, 0.5, 0.0], size=(200, 3)).astype(np.float32)
    scaled = descriptors.fit_descriptor(sample, "minmax", None, seed=0).apply(sample)
    np.testing.assert_allclose(scaled[:, :2].min(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(scaled[:, :2].max(axis=0), 1.0, atol=1e-6)
    assert (scaled[:, 2] == 0).all(), "a constant value is moved, not divided by zero"
    standard = descriptors.fit_descriptor(sample, "standard", None, seed=0)
    scaled = standard.apply(sample)
    np.testing.assert_allclose(scaled[:, :2].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(scaled[:, :2].std(axis=0), 1.0, atol=1e-5)
    # A new image is scaled with the sample's figures, not its own.
    new = np.array([[5.0, -2.0, 0.0]], np.float32)
    expected = (new - sample.mean(axis=0)) / np.where(sample.std(axis=0) > 0, sample.std(axis=0), 1)
    np.testing.assert_allclose(standard.apply(new), expected, atol=1e-5)


def test_pca_keeps_the_fewest_components_that_explain_the_share() -> None:
    rng = np.random.default_rng(1)
    # Variance falls off by axis: 10 values whose variances are 2^-i.
    sample = rng.normal(size=(500, 10)) * np.sqrt(2.0 ** -np.arange(10))
    share = 0.8
    fitted = descriptors.fit_descriptor(sample, "none", share, seed=0)
    kept = fitted.dimension(10)
    assert fitted.explained is not None and fitted.explained >= share
    fewer = descriptors.fit_descriptor(sample, "none", kept - 1, seed=0)
    assert fewer.explained is not None and fewer.explained < share
    assert fitted.apply(sample).shape == (500, kept)
    counted = descriptors.fit_descriptor(sample, "none", 3, seed=0)
    assert counted.apply(sample[:7]).shape == (7, 3)
    everything = descriptors.fit_descriptor(sample, "none", 50, seed=0)
    assert everything.dimension(10) == 10, "a count beyond the values keeps them all"


def test_a_descriptor_is_saved_with_the_same_bytes_and_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    sample = rng.normal(size=(100, 8)).astype(np.float32)
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    descriptors.write_descriptor(descriptors.fit_descriptor(sample, "standard", 4, seed=0), first)
    descriptors.write_descriptor(descriptors.fit_descriptor(sample, "standard", 4, seed=0), second)
    assert first.read_bytes() == second.read_bytes()
    read = descriptors.read_descriptor(first)
    fitted = descriptors.fit_descriptor(sample, "standard", 4, seed=0)
    np.testing.assert_array_equal(read.apply(sample), fitted.apply(sample))
    assert read.explained == pytest.approx(fitted.explained)
    with pytest.raises(common.UserError, match="dvc repro describe"):
        descriptors.read_descriptor(tmp_path / "absent.npz")


@pytest.mark.parametrize("value", [0, -3, 1.0, 1.5, 0.0, True, "half"])
def test_a_pca_that_is_neither_a_share_nor_a_count_names_the_key(
    params: dict, value: object
) -> None:
    params["describe"]["pca"] = value
    with pytest.raises(common.UserError) as error:
        describe.DescribeParams.from_params(params)
    message = str(error.value)
    assert message.startswith(f"params.yaml: describe.pca = {value!r} is not allowed")
    assert "share" in message and "\n" not in message


# ----------------------------------------------------------------------------- embed and train


def bovw_descriptor(keys: list[str], pca: int | None = None) -> descriptors.Descriptor:
    """What train fits for bovw on BAGS, files named by `keys`."""
    counts = descriptors.word_counts(
        keypoint_table(BAGS), keys, pd.Series(keys, index=list(BAGS)), VOCABULARY
    )
    idf = descriptors.inverse_document_frequency(counts)
    values = descriptors.tf_idf(counts, idf)
    return descriptors.fit_descriptor(values, "none", pca, 0, idf, "words-key")


def test_embed_writes_every_images_bag_and_reads_known_files_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embed, "BAG_ROWS", 2)  # bags made dense in several blocks
    ids = ["a", "b", "a-copy", "c", "d", "blank"]
    sha256s = ["sha-a", "sha-b", "sha-a", "sha-c", "sha-d", "sha-blank"]
    descriptor = bovw_descriptor(["sha-a", "sha-b", "sha-c", "sha-d"], pca=2)
    table = keypoint_table(BAGS)
    path, cache = tmp_path / "embeddings", tmp_path / "cache"
    made = embed.embed_bags(ids, sha256s, lambda: table, VOCABULARY, descriptor, cache, path)
    assert made == 5, "each distinct file once"
    read_ids, vectors = common.read_embeddings(path)
    assert read_ids == ids and vectors.shape == (6, 2)
    np.testing.assert_array_equal(vectors[0], vectors[2]), "a copy has its original's vector"
    distinct = list(dict.fromkeys(sha256s))
    counts = descriptors.word_counts(table, distinct, pd.Series(sha256s, index=ids), VOCABULARY)
    assert descriptor.idf is not None
    each = descriptor.apply(descriptors.tf_idf(counts, descriptor.idf))
    whole = each[[distinct.index(sha) for sha in sha256s]]
    np.testing.assert_allclose(vectors, whole, atol=1e-6)
    np.testing.assert_allclose(vectors[5], descriptor.apply(np.zeros((1, VOCABULARY)))[0])
    again = tmp_path / "again"

    def unread() -> pd.DataFrame:
        raise AssertionError("every vector is in the cache: the words need not be read")

    assert embed.embed_bags(ids, sha256s, unread, VOCABULARY, descriptor, cache, again) == 0
    assert folder_bytes(again) == folder_bytes(path)


def test_without_pca_an_image_without_words_is_a_zero_vector_not_an_error(
    tmp_path: Path,
) -> None:
    descriptor = bovw_descriptor(["sha-a", "sha-b", "sha-c", "sha-d"])
    path = tmp_path / "embeddings"
    embed.embed_bags(
        ["a", "blank"], ["sha-a", "sha-blank"], lambda: keypoint_table(BAGS), VOCABULARY,
        descriptor, tmp_path / "cache", path,
    )  # fmt: skip
    _, vectors = common.read_embeddings(path)
    assert vectors.shape == (2, VOCABULARY)
    assert (vectors[1] == 0).all() and np.linalg.norm(vectors[0]) == pytest.approx(1.0)


@pytest.fixture
def bovw_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params: dict) -> dict:
    """A project folder, its working directory, as the pipeline leaves it before describe
    with train.encoder: bovw: textured images (one an exact copy), their vocabulary and
    words, the image keys, the split, train's spec, and params with describe.pca: 4."""
    monkeypatch.chdir(tmp_path)
    common.COLLECTION_DIR.mkdir(parents=True)
    names = [f"image-{index:02d}.png" for index in range(24)]
    for index, name in enumerate(names):
        image = pattern_image(160, 120, index).resize((320, 240), Image.Resampling.NEAREST)
        image.save(common.COLLECTION_DIR / name)
    params = copy.deepcopy(params)
    params["words"].update({"vocabulary": 40, "vocabulary_images": 24, "max_keypoints": 50})
    params["train"]["encoder"] = "bovw"
    params["describe"].update({"pca": 4, "sample": 10})
    common.PARAMS_FILE.write_text(yaml.safe_dump(params))
    word_params = words.WordsParams.from_params(params)
    table = pd.DataFrame({"id": names, "path": names, "sha256": [f"sha-{n}" for n in names]})
    centers, found, failed = words.find_words(table, common.COLLECTION_DIR, word_params, 1)
    assert not failed
    words.VOCABULARY_FILE.parent.mkdir(parents=True, exist_ok=True)
    made_with = np.array(json.dumps(words.detector_params(word_params), sort_keys=True))
    np.savez(words.VOCABULARY_FILE, centers=centers, params=made_with)
    keys = {"words_key": words.words_key(word_params), "vocabulary": str(len(centers))}
    common.WORDS_DIR.mkdir(parents=True)
    common.write_parquet(found, common.WORDS_DIR / "part-00000.parquet", keys=keys)  # one part
    # An exact copy of image-05: in no words table (the words stage skips copies).
    ids = [*names, "copy-of-05"]
    sha256s = [*table["sha256"], table["sha256"][5]]
    common.write_parquet(
        pd.DataFrame({"id": ids, "sha256": sha256s}), common.ARRAY_IDS_FILE, {"pixels_key": "k"}
    )
    subsets = ["train" if index % 2 == 0 else "test" for index in range(len(ids))]
    common.write_parquet(pd.DataFrame({"id": ids, "subset": subsets}), common.SPLIT_FILE)
    train.write_models(None, {"encoder": "bovw"})
    return {"params": params, "ids": ids, "sha256s": sha256s}


def test_describe_counts_the_train_sample_and_embed_and_similar_agree(bovw_project: dict) -> None:
    ids, sha256s = bovw_project["ids"], bovw_project["sha256s"]
    assert sorted(path.name for path in common.AUTOENCODER_DIR.iterdir()) == ["spec.json"]
    describe.main()
    descriptor = descriptors.read_descriptor()
    metrics = json.loads(describe.METRICS_FILE.read_text())
    assert metrics["images"] == 10 and metrics["vocabulary"] == 40
    assert metrics["input_dimension"] == 40 and metrics["dimension"] == 4
    assert 0 < metrics["explained_variance"] < 1
    # The idf counts the sample only: 10 of the 12 even (train) images.
    params = describe.DescribeParams.from_params(bovw_project["params"])
    split = pd.read_parquet(common.SPLIT_FILE)
    rows = describe.sample_rows(split, ids, sha256s, params)
    assert len(rows) == 10 and all(row % 2 == 0 for row in rows)
    found = pd.read_parquet(common.WORDS_DIR)
    key_of = pd.Series(sha256s, index=ids)
    counts = descriptors.word_counts(found, [sha256s[row] for row in rows], key_of, 40)
    assert descriptor.idf is not None
    np.testing.assert_array_equal(descriptor.idf, descriptors.inverse_document_frequency(counts))
    embed.main()
    read_ids, vectors = common.read_embeddings()
    assert read_ids == ids and vectors.shape == (25, 4)
    np.testing.assert_array_equal(vectors[24], vectors[5]), "a copy has its original's bag"
    vector = similar.image_vector(common.COLLECTION_DIR / ids[7], bovw_project["params"])
    np.testing.assert_allclose(vector, vectors[7], atol=1e-5)
    nearest = similar.nearest_rows(vector, 1)
    assert nearest[0][1] == 7 and nearest[0][0] == pytest.approx(0.0, abs=1e-5)


def test_words_of_another_vocabulary_than_describe_counted_name_the_fix(
    bovw_project: dict,
) -> None:
    descriptors.write_descriptor(bovw_descriptor(["sha-a", "sha-b", "sha-c", "sha-d"]))
    with pytest.raises(common.UserError, match="dvc unfreeze describe"):
        embed.checked_words(descriptors.read_descriptor())
    with pytest.raises(common.UserError, match="other visual words"):
        similar.image_vector(common.COLLECTION_DIR / "image-00.png", bovw_project["params"])
