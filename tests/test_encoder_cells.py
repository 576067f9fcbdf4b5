"""words.detector: encoder: the cells of the trained encoder's last feature map as dense
local features, through the vocabulary and words as SIFT's are."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import pattern_image

from stages import common, embed, encoder_cells, encoder_runtime, similar, train, words
from stages.quiet_start import keras

HEIGHT, WIDTH = 16, 24


def built(params: dict, **train_values: object) -> train.Models:
    """The models train builds for 16x24 images with these train params."""
    params = copy.deepcopy(params)
    params["train"].update({"filters": [8, 4], **train_values})
    return train.build_models(HEIGHT, WIDTH, train.TrainParams.from_params(params))


def test_a_convolutional_encoder_gives_its_last_map_and_a_dense_one_is_refused(
    params: dict,
) -> None:
    models = built(params)
    feature_map = encoder_cells.feature_map_model(models.encoder)
    assert tuple(feature_map.output_shape[1:]) == (4, 6, 4)
    pixels = np.stack([np.asarray(pattern_image(WIDTH, HEIGHT, seed)) for seed in range(3)])
    maps = embed.predict_padded(feature_map, pixels, 8)
    # The encoder's latent is that map flattened: the cells are what embed's vector holds.
    flat = embed.predict_padded(models.encoder, pixels, 8)
    np.testing.assert_allclose(maps.reshape(3, -1), flat, rtol=1e-6)
    with pytest.raises(common.UserError, match="needs a convolutional encoder"):
        encoder_cells.feature_map_model(built(params, model="simple").encoder)


def test_a_pretrained_cnn_gives_the_map_before_its_pooling(params: dict, tmp_path: Path) -> None:
    keras.backend.clear_session()
    backbone = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(64, 64, 3), pooling="avg"
    )
    weights = tmp_path / "random.weights.h5"
    backbone.save_weights(weights)
    pretrained = {"name": "MobileNetV2", "weights": str(weights), "input_size": 64}
    models = built(params, encoder="pretrained", pretrained=pretrained)
    feature_map = encoder_cells.feature_map_model(models.encoder)
    assert tuple(feature_map.output_shape[1:]) == (2, 2, 1280)
    pixels = np.stack([np.asarray(pattern_image(WIDTH, HEIGHT, seed)) for seed in range(2)])
    maps = embed.predict_padded(feature_map, pixels, 4)
    pooled = embed.predict_padded(models.encoder, pixels, 4)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), pooled, rtol=1e-4, atol=1e-5)
    # embed's default runtime runs the same CNN, converted to LiteRT.
    train.save_model(models.encoder, tmp_path / "encoder.keras")
    lite = encoder_runtime.open_encoder(
        tmp_path / "encoder.keras", (HEIGHT, WIDTH, 3), "litert", tmp_path / "litert"
    )
    np.testing.assert_allclose(lite.encode(pixels, 4), pooled, rtol=1e-4, atol=1e-5)


def test_the_strongest_cells_are_kept_with_their_centres_as_places() -> None:
    maps = np.zeros((1, 2, 3, 2), np.float32)
    maps[0, 1, 2] = [3.0, 4.0]  # length 5: the strongest
    maps[0, 0, 1] = [0.0, 2.0]
    maps[0, 1, 0] = [2.0, 0.0]  # as strong as (0, 1): the earlier row comes first
    [found] = encoder_cells.cell_keypoints(maps, 3)
    np.testing.assert_allclose(
        found.places,
        [[5 / 6, 3 / 4, 1 / 3], [1 / 2, 1 / 4, 1 / 3], [1 / 6, 3 / 4, 1 / 3]],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(found.descriptors, [[3, 4], [0, 2], [2, 0]])


@pytest.fixture
def cells_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params: dict) -> dict:
    """A project folder (the working directory) with 40 prepared 16x24 images, an
    untrained simple_conv encoder saved as train saves it, and words params for the
    encoder's cells."""
    monkeypatch.chdir(tmp_path)
    ids = [f"image-{index:02d}" for index in range(40)]
    pixels = np.stack([np.asarray(pattern_image(WIDTH, HEIGHT, seed)) for seed in range(40)])
    common.PIXELS_DIR.mkdir(parents=True)
    np.save(common.PIXELS_DIR / "part-00000.npy", pixels)
    table = pd.DataFrame({"id": ids, "path": [f"{i}.png" for i in ids], "sha256": ids})
    common.write_parquet(table[["id", "sha256"]], common.ARRAY_IDS_FILE, {"pixels_key": "p1"})
    models = built(params)
    train.write_models(models, train.keras_spec(models, train.TrainParams.from_params(params), 96))
    params = copy.deepcopy(params)
    params["image"].update({"height": HEIGHT, "width": WIDTH, "fit": "squash"})
    params["words"].update({"detector": "encoder", "vocabulary": 20, "max_keypoints": 10})
    common.PARAMS_FILE.write_text(yaml.safe_dump(params))
    return {"params": params, "table": table, "pixels": pixels}


def test_cells_become_words_and_are_cached(cells_project: dict) -> None:
    params = words.WordsParams.from_params(cells_project["params"])
    table = cells_project["table"]
    centers, failed = words.vocabulary_of(table, common.COLLECTION_DIR, params, 1)
    assert centers.shape == (20, 4) and not failed
    made_with = words.detector_params(params)
    assert made_with["encoder"] and made_with["pixels"] == "p1"
    cache = words.ContentCache(common.CACHE_DIR / "words", (), ("keypoints",))
    found, failed, read = words.words_of(table, common.COLLECTION_DIR, params, centers, 1, cache)
    assert read == 40 and not failed
    assert (found.groupby("id").size() == 10).all(), "the 10 strongest of 24 cells"
    # Every keypoint sits on a cell centre of the 4x6 map, and is its descriptor's word.
    np.testing.assert_allclose(((found["x"] * 6) - 0.5) % 1, 0, atol=1e-5)
    np.testing.assert_allclose(((found["y"] * 4) - 0.5) % 1, 0, atol=1e-5)
    model = encoder_cells.feature_map_model(
        embed.load_encoder(common.ENCODER_FILE, (HEIGHT, WIDTH, 3))
    )
    maps = embed.predict_padded(model, cells_project["pixels"][:1], encoder_cells.BATCH)
    [first] = encoder_cells.cell_keypoints(maps, 10)
    expected = words.nearest_words(first.descriptors, centers)
    np.testing.assert_array_equal(found[found["id"] == "image-00"]["word"], expected)
    again, _, read = words.words_of(table, common.COLLECTION_DIR, params, centers, 1, cache)
    assert read == 0
    pd.testing.assert_frame_equal(again, found)


def test_encoder_cells_need_an_encoder_which_bovw_has_not(cells_project: dict) -> None:
    params = words.WordsParams.from_params(cells_project["params"])
    train.write_models(None, {"encoder": "bovw"})
    with pytest.raises(common.UserError, match="bovw makes none"):
        words.detector_params(params)


def test_the_similar_command_finds_the_cells_an_image_has(
    cells_project: dict, tmp_path: Path
) -> None:
    from PIL import Image

    params = words.WordsParams.from_params(cells_project["params"])
    image = Image.fromarray(cells_project["pixels"][3])
    image.save(tmp_path / "query.png")
    found = similar.image_keypoints(tmp_path / "query.png", cells_project["params"], params)
    model = encoder_cells.feature_map_model(
        embed.load_encoder(common.ENCODER_FILE, (HEIGHT, WIDTH, 3))
    )
    maps = embed.predict_padded(model, cells_project["pixels"][3:4], encoder_cells.BATCH)
    [expected] = encoder_cells.cell_keypoints(maps, 10)
    np.testing.assert_array_equal(found.places, expected.places)
    np.testing.assert_allclose(found.descriptors, expected.descriptors, rtol=1e-5)
    assert json.dumps(words.detector_params(params))  # the vocabulary's record is plain JSON
