"""The words, mine and patterns stages: visual words, structures planted in a collection
found again by Sampled MinHashing, and the images holding each found again with the
mined patterns alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages import mine, pattern_model, patterns, words

IMAGES = 300
PLANTED_SHARE = 0.15  # of the images, for each kind of object
WORDS = words.WordsParams(
    detector="sift", side=480, max_keypoints=300, vocabulary=500, vocabulary_images=IMAGES, seed=0
)
MINING = pattern_model.PatternsParams()  # the shipped defaults


# ----------------------------------------------------------------------------- a collection


def background(rng: np.random.Generator, width: int = 320, height: int = 240) -> Image.Image:
    """Smooth noise, a gradient or a wave texture, with a little grain."""
    y, x = np.mgrid[0:height, 0:width]
    kind = rng.integers(0, 3)
    if kind == 0:
        coarse = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        base = np.asarray(image, dtype=np.float64)
    elif kind == 1:
        angle = rng.uniform(0, np.pi)
        ramp = (np.cos(angle) * x + np.sin(angle) * y) / (width + height) * 255
        base = ramp[..., None] * rng.uniform(0.5, 1, 3)
    else:
        period = rng.uniform(8, 30)
        wave = np.sin(x / period + rng.uniform(0, 6)) * np.sin(y / period * rng.uniform(0.5, 2))
        base = wave[..., None] * 60 + 120 + np.zeros(3)
    base = base + rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def textured_object(seed: int, side: int = 64) -> Image.Image:
    """A small object: an 8x8 block texture in one color."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 2, (8, 8))
    blocks = np.kron(cells, np.ones((side // 8, side // 8)))[..., None] * rng.integers(60, 255, 3)
    return Image.fromarray(blocks.astype(np.uint8))


def paste(image: Image.Image, thing: Image.Image, rng: np.random.Generator) -> None:
    """`thing` at a random place, size (+-30%) and rotation (+-20 degrees)."""
    side = max(8, int(thing.width * rng.uniform(0.7, 1.3)))
    turned = (
        thing.resize((side, side), Image.Resampling.BILINEAR)
        .convert("RGBA")
        .rotate(rng.uniform(-20, 20), expand=True, resample=Image.Resampling.BILINEAR)
    )
    x = int(rng.integers(0, image.width - turned.width))
    y = int(rng.integers(0, image.height - turned.height))
    image.paste(turned, (x, y), turned)


@dataclass(frozen=True)
class Collection:
    folder: Path
    table: pd.DataFrame  # id, path, sha256, planted (-1: none, else the object's kind)


def planted_collection(folder: Path, kinds: int, seed: int = 1) -> Collection:
    rng = np.random.default_rng(seed)
    things = [textured_object(100 + kind) for kind in range(kinds)]
    rows = []
    for index in range(IMAGES):
        image = background(rng)
        planted = -1
        if rng.random() < PLANTED_SHARE * kinds:
            planted = int(rng.integers(0, kinds))
            paste(image, things[planted], rng)
        name = f"image-{index:04d}.png"
        image.save(folder / name)
        rows.append({"id": name[:-4], "path": name, "sha256": f"{index:064x}", "planted": planted})
    return Collection(folder, pd.DataFrame(rows))


def best_match(found: pd.DataFrame, holders: pd.DataFrame, planted: set[str]) -> tuple:
    """The pattern whose images best match `planted`: (precision, recall, pattern)."""
    best = (0.0, 0.0, 0)
    for number in found["pattern"]:
        held = set(holders.loc[holders["pattern"] == number, "id"])
        both = len(held & planted)
        score = (both / len(held), both / len(planted), int(number))
        best = max(best, score, key=lambda s: s[0] + s[1])
    return best


@pytest.mark.parametrize("kinds", [1, 2])
def test_planted_objects_are_found_as_patterns(tmp_path: Path, kinds: int) -> None:
    collection = planted_collection(tmp_path, kinds)
    _, table, failed = words.find_words(collection.table, tmp_path, WORDS, workers=2)
    assert failed == []
    ids = collection.table["id"].tolist()
    found, holders, *_ = mine.mine_patterns(table, ids, MINING)
    assert (found["support"] >= MINING.min_support).all()
    assert found["support"].is_monotonic_decreasing, "ranked by support"
    matched = set()
    for kind in range(kinds):
        planted = set(collection.table.loc[collection.table["planted"] == kind, "id"])
        assert len(planted) >= 30
        precision, recall, number = best_match(found, holders, planted)
        assert precision >= 0.9 and recall >= 0.9, (kind, precision, recall)
        matched.add(number)
    assert len(matched) == kinds, "each kind of object is its own pattern"


def test_same_data_and_params_give_the_same_vocabulary_words_and_patterns(
    tmp_path: Path,
) -> None:
    collection = planted_collection(tmp_path, kinds=1, seed=5)
    subset = collection.table.iloc[:120].reset_index(drop=True)
    params = WORDS.model_copy(update={"vocabulary": 200, "vocabulary_images": 80})
    first = words.find_words(subset, tmp_path, params, workers=2)
    again = words.find_words(subset, tmp_path, params, workers=1)
    assert np.array_equal(first[0], again[0]), "the vocabulary"
    pd.testing.assert_frame_equal(first[1], again[1])
    mining = MINING.model_copy(update={"min_support": 3})
    mined = mine.mine_patterns(first[1], subset["id"].tolist(), mining)
    remined = mine.mine_patterns(again[1], subset["id"].tolist(), mining)
    pd.testing.assert_frame_equal(mined[0], remined[0])
    pd.testing.assert_frame_equal(mined[1], remined[1])
    assert len(mined[0]) > 0


def test_an_unreadable_image_is_named_and_the_others_get_their_words(tmp_path: Path) -> None:
    collection = planted_collection(tmp_path, kinds=1, seed=7)
    subset = collection.table.iloc[:12].reset_index(drop=True)
    (tmp_path / subset.loc[3, "path"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    params = WORDS.model_copy(update={"vocabulary": 20, "vocabulary_images": 12})
    _, table, failed = words.find_words(subset, tmp_path, params, workers=1)
    assert len(failed) == 1 and subset.loc[3, "path"] in failed[0]
    assert "cannot be decoded" in failed[0]
    broken = subset.loc[3, "id"]
    with_words = set(table["id"])
    assert broken not in with_words and with_words <= set(subset["id"])
    assert len(with_words) >= 6, "the others are read (a smooth gradient may have no keypoint)"
    assert table["x"].between(0, 1).all() and table["y"].between(0, 1).all()


def test_a_vocabulary_larger_than_the_descriptors_names_the_param(tmp_path: Path) -> None:
    collection = planted_collection(tmp_path, kinds=1, seed=8)
    subset = collection.table.iloc[:3].reset_index(drop=True)
    params = WORDS.model_copy(update={"vocabulary": 5000, "vocabulary_images": 3})
    with pytest.raises(words.common.UserError, match=r"words\.vocabulary = 5000 is more"):
        words.find_words(subset, tmp_path, params, workers=1)


def test_weights_count_keypoints_or_their_size() -> None:
    table = pd.DataFrame(
        {"row": [0, 0, 0, 1], "word": [4, 4, 2, 4], "size": [0.05, 0.03, 0.2, 0.001]}
    )
    frequency = pattern_model.image_word_weights(table, "frequency")
    assert frequency.to_dict("list") == {"row": [0, 0, 1], "word": [2, 4, 4], "weight": [1, 2, 1]}
    size = pattern_model.image_word_weights(table, "size")
    assert size["weight"].tolist() == [10, 4, 1], "steps of 0.02 of the long side, at least 1"
    word, element = mine.elements(frequency)
    assert word.tolist() == [2, 4, 4, 4]
    # Inverted files of images: word 4 holds image 0 twice (two copies) and image 1.
    step = mine.MAX_WEIGHT + 1
    assert element[word == 4].tolist() == [0, 1, step] and element[word == 2].tolist() == [0]


def test_min_hashes_are_seeded_and_differ_between_seeds() -> None:
    values = np.arange(1000, dtype=np.uint64)
    assert np.array_equal(mine.splitmix64(values, 3), mine.splitmix64(values, 3))
    assert not np.array_equal(mine.splitmix64(values, 3), mine.splitmix64(values, 4))
    order = np.argsort(mine.splitmix64(values, 3))
    assert not np.array_equal(order, np.arange(1000)), "a fresh order, not the identity"


def test_words_of_known_images_come_from_the_cache(tmp_path: Path) -> None:
    collection = planted_collection(tmp_path, kinds=1, seed=11)
    first, grown = collection.table.iloc[:10], collection.table.iloc[:12]
    params = WORDS.model_copy(update={"vocabulary": 30, "vocabulary_images": 10})
    centers, _ = words.vocabulary_of(first, tmp_path, params, workers=1)
    cache = words.ContentCache(tmp_path / "cache", arrays=(), blobs=("keypoints",))
    before, _, read = words.words_of(first, tmp_path, params, centers, 1, cache)
    assert read == 10
    after, _, read = words.words_of(grown, tmp_path, params, centers, 1, cache)
    assert read == 2, "only the new images are read"
    fresh, _, _ = words.words_of(grown, tmp_path, params, centers, 1)
    pd.testing.assert_frame_equal(after, fresh)
    pd.testing.assert_frame_equal(after[after["id"].isin(first["id"])], before)


def test_a_vocabulary_of_another_detector_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "vocabulary.npz"
    made_with = words.json.dumps(words.detector_params(WORDS), sort_keys=True)
    np.savez(path, centers=np.zeros((3, 128), np.float32), params=np.array(made_with))
    assert words.read_vocabulary(WORDS, path).shape == (3, 128)
    orb = WORDS.model_copy(update={"detector": "orb"})
    with pytest.raises(words.common.UserError, match="dvc unfreeze vocabulary"):
        words.read_vocabulary(orb, path)


def zipf_bags(count: int, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Words of `count` images (40 keypoints over 300 words, Zipf-like), a set of 6 rare
    words planted in a tenth of them."""
    rng = np.random.default_rng(seed)
    law = 1 / np.arange(1, 301) ** 0.9
    drawn = rng.choice(300, size=(count, 40), p=law / law.sum())
    planted = rng.random(count) < 0.1
    drawn[planted, :6] = [290, 291, 293, 295, 297, 299]
    ids = [f"img-{seed}-{index:04d}" for index in range(count)]
    table = pd.DataFrame(
        {"id": np.repeat(ids, 40), "word": drawn.ravel().astype(np.int32), "size": 0.02}
    )
    return table, ids


def test_new_images_update_the_kept_min_hashes_and_give_what_mining_afresh_gives() -> None:
    params = MINING.model_copy(update={"min_support": 4, "max_word_share": 0.3})
    first, first_ids = zipf_bags(300, seed=1)
    new, new_ids = zipf_bags(30, seed=2)
    earlier = mine.mine_patterns(first, first_ids, params)
    assert earlier.hashed == 300
    # Images arrive in any order: the new ones sort between the old ones.
    ids = sorted(first_ids + new_ids, key=lambda name: name[::-1])
    both = pd.concat([first, new], ignore_index=True)
    updated = mine.mine_patterns(both, ids, params, previous=earlier.state)
    afresh = mine.mine_patterns(both, ids, params)
    assert updated.hashed == 30 and afresh.hashed == 330
    # The kept words changed as the images came (support and share bounds).
    assert not np.array_equal(updated.state.words, earlier.state.words)
    np.testing.assert_array_equal(updated.state.words, afresh.state.words)
    np.testing.assert_array_equal(updated.state.minimums, afresh.state.minimums)
    pd.testing.assert_frame_equal(updated.patterns, afresh.patterns)
    pd.testing.assert_frame_equal(updated.image_patterns, afresh.image_patterns)
    assert len(afresh.patterns) > 0


def test_a_changed_or_removed_image_makes_mining_start_afresh(tmp_path: Path) -> None:
    table, ids = zipf_bags(200, seed=3)
    earlier = mine.mine_patterns(table, ids, MINING, ids)
    path = tmp_path / "kept.npz"
    earlier.state.save(path)
    kept = mine.MinHashState.load(path)
    assert kept is not None and kept.images == earlier.state.images
    changed = [*ids[:-1], "another file"]
    assert mine.mine_patterns(table, ids, MINING, changed, kept).hashed == 200
    fewer = table[table["id"] != ids[0]]
    assert mine.mine_patterns(fewer, ids[1:], MINING, ids[1:], kept).hashed == 199
    assert mine.mine_patterns(table, ids, MINING, ids, kept).hashed == 0
    path.write_bytes(b"not an npz")
    assert mine.MinHashState.load(path) is None, "a damaged file is ignored"


def test_the_mined_patterns_alone_find_the_holders_and_new_images_alone_are_looked_at(
    tmp_path: Path,
) -> None:
    params = MINING.model_copy(update={"min_support": 4, "max_word_share": 0.3})
    first, first_ids = zipf_bags(300, seed=1)
    new, new_ids = zipf_bags(30, seed=2)
    mined = mine.mine_patterns(first, first_ids, params)
    assert len(mined.patterns) > 0
    words_dir = tmp_path / "words"
    words_dir.mkdir()
    words_file = words_dir / "part-00000.parquet"
    cache = patterns.ContentCache(tmp_path / "held", arrays=(), blobs=("held",))

    def holders(ids: list[str], cache: patterns.ContentCache) -> tuple[pd.DataFrame, int]:
        images = pd.DataFrame({"id": ids, "sha256": [f"sha-{i}" for i in ids]})
        return patterns.cached_holders(images, mined.patterns, params.min_share, cache, words_dir)

    patterns.common.write_parquet(first, words_file)
    found, looked_at = holders(first_ids, cache)
    assert looked_at == 300
    pd.testing.assert_frame_equal(found, mined.image_patterns)
    # New images arrive, in any order among the old ones: only they are looked at.
    ids = sorted(first_ids + new_ids, key=lambda name: name[::-1])
    patterns.common.write_parquet(pd.concat([first, new], ignore_index=True), words_file)
    grown, looked_at = holders(ids, cache)
    assert looked_at == 30
    fresh, _ = holders(ids, patterns.ContentCache(tmp_path / "fresh", (), ("held",)))
    pd.testing.assert_frame_equal(grown, fresh)
    earlier = grown[grown["id"].isin(first_ids)].reset_index(drop=True)
    pd.testing.assert_frame_equal(earlier, mined.image_patterns)
    assert grown["id"].isin(new_ids).any(), "new images hold patterns too"
    support = patterns.patterns_table(mined.patterns, grown)["support"]
    assert (support.to_numpy() >= mined.patterns["support"].to_numpy()).all()


def test_patterns_mined_from_other_words_name_the_fix(tmp_path: Path) -> None:
    table, ids = zipf_bags(100, seed=4)
    mined = mine.mine_patterns(table, ids, MINING.model_copy(update={"min_support": 3}))
    path = tmp_path / "patterns.parquet"
    pattern_model.write_model(mined.patterns, "vocabulary-a", path)
    read = pattern_model.read_model("vocabulary-a", path)
    assert [list(w) for w in read["words"]] == mined.patterns["words"].tolist()
    with pytest.raises(patterns.common.UserError, match="dvc unfreeze mine && dvc repro mine"):
        pattern_model.read_model("vocabulary-b", path)


def test_words_parts_are_written_again_only_where_their_images_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(words, "PART_IMAGES", 4)
    rng = np.random.default_rng(0)
    names = [f"img-{index:02d}" for index in range(14)]
    blobs = {f"sha-{n}": words.packed(rng.random((3, 3)), rng.integers(0, 9, 3)) for n in names}
    blobs["sha-img-05"] = b""  # no keypoints
    table = pd.DataFrame({"id": names, "sha256": [f"sha-{n}" for n in names]})
    folder = tmp_path / "words"
    keys = {"words_key": "key-a", "vocabulary": "9"}
    asked: list[str] = []

    def blobs_of(shas: list[str]) -> dict[str, bytes]:
        asked.extend(shas)
        return {sha: blobs[sha] for sha in shas}

    assert words.write_parts(table.iloc[:10], keys, blobs_of, set(), folder) == 3
    first = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    # Four more images at the end: the last part (2 images) is written again, one is new.
    asked.clear()
    assert words.write_parts(table, keys, blobs_of, set(), folder) == 2
    assert asked == table["sha256"].tolist()[8:]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name in first} == {
        **first,
        "part-00002.parquet": (folder / "part-00002.parquet").stat().st_mtime_ns,
    }
    read = words.common.read_words_table(folder).astype({"id": str})
    pd.testing.assert_frame_equal(read, words.table_of(table, blobs))
    assert set(read["id"]) == set(names) - {"img-05"}
    assert words.common.parquet_keys(folder, "words")["words_key"] == "key-a"
    # Renewed images, another words key, and fewer images.
    assert words.write_parts(table, keys, blobs_of, {"sha-img-01"}, folder) == 1
    assert words.write_parts(table, {**keys, "words_key": "key-b"}, blobs_of, set(), folder) == 4
    assert words.write_parts(table.iloc[:5], keys, blobs_of, set(), folder) == 2
    assert [p.name for p in words.common.words_parts(folder)] == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]


def test_images_without_words_or_without_patterns_hold_none() -> None:
    table, ids = zipf_bags(100, seed=6)
    mined = mine.mine_patterns(table, ids, MINING.model_copy(update={"min_support": 3}))
    assert len(mined.patterns) > 0
    empty = table.iloc[:0]
    assert patterns.held_patterns(empty, ["a", "b"], mined.patterns, 0.4) == [b"", b""]
    common_only = pd.DataFrame({"id": ["a"] * 3, "word": [0, 1, 2]})  # the commonest words
    assert patterns.held_patterns(common_only, ["a"], mined.patterns, 0.4) == [b""]


def test_mine_fits_on_a_sample_by_content_that_keeps_as_the_collection_grows() -> None:
    names = [f"img-{index:04d}" for index in range(400)]
    images = pd.DataFrame({"id": names, "sha256": [f"sha-{name}" for name in names]})
    assert mine.mining_images(images, 500, 0).equals(images), "all of them up to the sample"
    chosen = mine.mining_images(images.iloc[:300], 100, 0)
    assert 88 <= len(chosen) <= 100
    shuffled = images.iloc[:300].sample(frac=1, random_state=1)
    assert set(mine.mining_images(shuffled, 100, 0)["id"]) == set(chosen["id"]), "by content"
    grown = mine.mining_images(images.iloc[:310], 100, 0)
    assert set(chosen["id"]) <= set(grown["id"]), "a few more images leave the sample as it was"
    assert set(mine.mining_images(images.iloc[:300], 100, 1)["id"]) != set(chosen["id"])


def test_image_patterns_are_listed_by_pattern_then_best_score_then_id() -> None:
    rng = np.random.default_rng(2)
    ids = [f"frame-{value:05d}" for value in rng.permutation(3000)]
    counts = rng.integers(0, 4, len(ids))
    rows = np.repeat(np.arange(len(ids)), counts)
    patterns = np.concatenate([rng.choice(40, count, replace=False) for count in counts])
    scores = rng.choice([0.25, 0.5, 0.75, 1.0], len(rows)).astype(np.float32)  # many ties
    table = pattern_model.image_patterns_table(ids, rows, patterns, scores)
    expected = sorted(
        zip(np.array(ids)[rows].tolist(), patterns.tolist(), scores.tolist(), strict=True),
        key=lambda held: (held[1], -held[2], held[0]),
    )
    assert list(table.itertuples(index=False, name=None)) == expected
    assert table["pattern"].dtype == np.int32 and table["score"].dtype == np.float32


def test_the_first_rows_of_each_pattern_are_those_pandas_heads_give() -> None:
    rng = np.random.default_rng(2)
    for count in (0, 1, 9, 500):
        table = pd.DataFrame({"pattern": rng.integers(0, 7, count), "row": np.arange(count)})
        for first in (1, 3):
            chosen = table[patterns.first_of_each(table["pattern"].to_numpy(), first)]
            assert chosen.equals(table.groupby("pattern").head(first))
