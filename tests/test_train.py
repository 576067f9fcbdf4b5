"""train: every model kind, reproducibility, the pretrained encoder and the errors."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import in_fresh_process, pattern_image

from stages import autoencoders, common, train

HEIGHT, WIDTH = 16, 24


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Forty-eight small RGB images with real structure."""
    return np.stack([np.asarray(pattern_image(WIDTH, HEIGHT, seed)) for seed in range(48)])


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    """A fixed train / valid / test split of the 48 rows."""
    return {"train": np.arange(32), "valid": np.arange(32, 40), "test": np.arange(40, 48)}


def settings(params: dict[str, Any], **changes: Any) -> train.TrainParams:
    """Small, fast train params: two conv blocks, a 12-value latent, 2 epochs."""
    params = copy.deepcopy(params)
    params["train"].update(
        {"filters": [8, 4], "latent_dim": 12, "epochs": 2, "batch_size": 16, **changes}
    )
    return train.TrainParams.from_params(params)


def pretrained_settings(params: dict[str, Any], weights: Path) -> train.TrainParams:
    """Params for a MobileNetV2 encoder at 32x32 with weights from a local file."""
    params = copy.deepcopy(params)
    params["train"]["encoder"] = "pretrained"
    params["train"]["pretrained"] = {
        "name": "MobileNetV2",
        "weights": str(weights),
        "input_size": 32,
    }
    return train.TrainParams.from_params(params)


@pytest.mark.parametrize("model", autoencoders.MODELS)
def test_every_model_kind_trains_and_encodes_to_its_size(
    params: dict[str, Any], pixels: np.ndarray, rows: dict, model: str
) -> None:
    chosen = settings(params, model=model)
    models = train.build_models(HEIGHT, WIDTH, chosen)
    result = train.fit(models, pixels, rows, chosen)

    expected = 12 if model != "simple_conv" else (HEIGHT // 4) * (WIDTH // 4) * 4
    codes = models.encoder.predict_on_batch(pixels[:5].astype(np.float32) / 255)
    assert np.asarray(codes).reshape(5, -1).shape == (5, expected)
    assert result.metrics["latent_dim"] == expected
    rebuilt = models.autoencoder.predict_on_batch(pixels[:5].astype(np.float32) / 255)
    assert np.asarray(rebuilt).shape == (5, HEIGHT, WIDTH, 3)
    assert result.metrics["epochs"] == 2 and len(result.history) == 2
    assert result.metrics["test_loss"] is not None and result.metrics["test_loss"] > 0


def test_the_variational_models_add_a_kl_loss(params: dict[str, Any], pixels: np.ndarray) -> None:
    models = train.build_models(HEIGHT, WIDTH, settings(params, model="conv_vae"))
    models.trainable(pixels[:4].astype(np.float32) / 255)
    assert len(models.trainable.losses) == 1
    assert float(models.trainable.losses[0]) >= 0


def test_the_iss_size_gives_the_original_3x6x16_latent(params: dict[str, Any]) -> None:
    chosen = train.TrainParams.from_params(params)
    models = train.build_models(27, 48, chosen.model_copy(update={"filters": [64, 32, 16]}))
    assert tuple(models.encoder.get_layer("latent").input.shape[1:]) == (3, 6, 16)
    assert models.encoder.output_shape == (None, 288)
    assert models.autoencoder.output_shape == (None, 27, 48, 3)


def test_a_run_in_another_process_gives_identical_model_files(
    params: dict[str, Any], pixels: np.ndarray, rows: dict, tmp_path: Path
) -> None:
    # What a forced `dvc repro train` relies on to leave embed alone: the same weights and
    # the same file bytes from a new process (no save time, addresses or layer counters).
    chosen = settings(params)
    models = train.build_models(HEIGHT, WIDTH, chosen)
    train.fit(models, pixels, rows, chosen)
    train.save_model(models.encoder, tmp_path / "encoder-here.keras")
    train.save_model(models.autoencoder, tmp_path / "autoencoder-here.keras")
    code = f"""
from pathlib import Path
from stages import train
chosen = inputs["settings"]
models = train.build_models({HEIGHT}, {WIDTH}, chosen)
train.fit(models, inputs["pixels"], inputs["rows"], chosen)
train.save_model(models.encoder, Path("encoder-there.keras"))
train.save_model(models.autoencoder, Path("autoencoder-there.keras"))
"""
    in_fresh_process({"settings": chosen, "pixels": pixels, "rows": rows}, code, tmp_path)
    for name in ("encoder", "autoencoder"):
        here = (tmp_path / f"{name}-here.keras").read_bytes()
        assert here == (tmp_path / f"{name}-there.keras").read_bytes(), name


def test_a_train_killed_while_writing_its_models_leaves_nothing_past_the_next_run(
    params: dict[str, Any], pixels: np.ndarray, rows: dict, tmp_path: Path
) -> None:
    chosen = settings(params)
    train_and_write = f"""
import os, signal
from stages import train
chosen = inputs["settings"]
models = train.build_models({HEIGHT}, {WIDTH}, chosen)
result = train.fit(models, inputs["pixels"], inputs["rows"], chosen)
if inputs.get("kill"):
    real_save = train.save_model
    def save_then_die(model, path):
        real_save(model, path)
        os.kill(os.getpid(), signal.SIGKILL)  # killed halfway through writing its models
    train.save_model = save_then_die
spec = train.keras_spec(models, chosen, result.metrics["latent_dim"])
train.write_models(models, spec)
"""
    inputs = {"settings": chosen, "pixels": pixels, "rows": rows, "kill": True}
    with pytest.raises(AssertionError, match="returncode == -9"):
        in_fresh_process(inputs, train_and_write, tmp_path)  # killed by SIGKILL, exit -9
    models = tmp_path / common.AUTOENCODER_DIR.parent
    prefix = common.staging_prefix(common.AUTOENCODER_DIR)
    [left] = [path for path in models.iterdir() if path.name.startswith(prefix)]
    assert [path.name for path in left.iterdir()] == [common.ENCODER_FILE.name]
    assert not (tmp_path / common.AUTOENCODER_DIR).exists(), "nothing half-written in place"
    in_fresh_process({**inputs, "kill": False}, train_and_write, tmp_path)
    assert [path.name for path in models.iterdir()] == [common.AUTOENCODER_DIR.name]
    written = sorted(path.name for path in (tmp_path / common.AUTOENCODER_DIR).iterdir())
    assert written == ["autoencoder.keras", "encoder.keras", "spec.json"]


def test_each_subset_is_a_seeded_sample_of_at_most_train_sample_images() -> None:
    ids = [f"image-{row}" for row in range(100)]
    split = pd.DataFrame({"id": ids[::-1], "subset": (["train"] * 70 + ["test"] * 30)[::-1]})
    rows = train.subset_rows(split, ids, sample=20, seed=1)
    assert [len(rows[name]) for name in ("train", "valid", "test")] == [20, 0, 20]
    assert set(rows["train"]) <= set(range(70)) and set(rows["test"]) <= set(range(70, 100))
    assert list(rows["train"]) == sorted(rows["train"])
    again = train.subset_rows(split, ids, sample=20, seed=1)
    assert all(np.array_equal(rows[name], again[name]) for name in rows)
    assert not np.array_equal(train.subset_rows(split, ids, 20, seed=2)["train"], rows["train"])
    whole = train.subset_rows(split, ids, sample=100, seed=1)
    assert list(whole["train"]) == list(range(70)), "no sample below the bound"


def test_another_seed_gives_other_weights(
    params: dict[str, Any], pixels: np.ndarray, rows: dict
) -> None:
    encoded = []
    for seed in (1, 2):
        chosen = settings(params, seed=seed)
        models = train.build_models(HEIGHT, WIDTH, chosen)
        train.fit(models, pixels, rows, chosen)
        encoded.append(np.asarray(models.encoder.predict_on_batch(pixels[:4] / 255.0)))
    assert not np.allclose(encoded[0], encoded[1])


def test_a_saved_encoder_loads_and_encodes_the_same(
    params: dict[str, Any], pixels: np.ndarray, tmp_path: Path
) -> None:
    models = train.build_models(HEIGHT, WIDTH, settings(params, model="vae"))
    train.save_model(models.encoder, tmp_path / "encoder.keras")
    loaded = keras.saving.load_model(tmp_path / "encoder.keras", compile=False)
    images = pixels[:6].astype(np.float32) / 255
    np.testing.assert_allclose(
        np.asarray(loaded.predict_on_batch(images)),
        np.asarray(models.encoder.predict_on_batch(images)),
        rtol=1e-6,
    )


def test_early_stopping_keeps_the_best_epoch(
    params: dict[str, Any], pixels: np.ndarray, rows: dict
) -> None:
    chosen = settings(params, epochs=6, patience=1, learning_rate=0.05)
    result = train.fit(train.build_models(HEIGHT, WIDTH, chosen), pixels, rows, chosen)
    history = result.history
    best = int(history["val_loss"].astype(float).idxmin())
    assert result.metrics["best_epoch"] == best + 1
    assert result.metrics["val_loss"] == pytest.approx(history["val_loss"][best], rel=1e-5)
    assert len(history) <= 6


def test_the_pretrained_encoder_loads_weights_from_a_file(
    params: dict[str, Any], pixels: np.ndarray, rows: dict, tmp_path: Path
) -> None:
    keras.backend.clear_session()
    keras.utils.set_random_seed(7)
    backbone = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    )
    weights_file = tmp_path / "mobilenet_v2_random.weights.h5"
    backbone.save_weights(weights_file)
    reference = backbone.get_layer("Conv1").get_weights()[0]

    chosen = pretrained_settings(params, weights_file)
    models = train.build_models(HEIGHT, WIDTH, chosen)
    loaded = models.encoder.get_layer(index=-1).get_layer("Conv1").get_weights()[0]
    np.testing.assert_array_equal(loaded, reference)
    codes = np.asarray(models.encoder.predict_on_batch(pixels[:3] / 255.0))
    assert codes.shape == (3, 1280)
    result = train.fit(models, pixels, rows, chosen)
    assert models.autoencoder is None and result.metrics["epochs"] == 0


def test_a_missing_weights_file_is_named(params: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.weights.h5"
    chosen = pretrained_settings(params, missing)
    with pytest.raises(common.UserError, match=re.escape(f"file {missing} does not exist")):
        train.build_models(HEIGHT, WIDTH, chosen)


def test_weights_of_another_network_are_refused_clearly(
    params: dict[str, Any], tmp_path: Path
) -> None:
    keras.backend.clear_session()
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    other.save_weights(tmp_path / "other.weights.h5")
    chosen = pretrained_settings(params, tmp_path / "other.weights.h5")
    with pytest.raises(common.UserError, match=r"cannot load .* into MobileNetV2"):
        train.build_models(HEIGHT, WIDTH, chosen)


def test_an_empty_train_subset_is_a_clear_error(params: dict[str, Any], pixels: np.ndarray) -> None:
    chosen = settings(params)
    empty = {"train": np.arange(0), "valid": np.arange(8), "test": np.arange(8, 16)}
    with pytest.raises(common.UserError, match="the train subset is empty"):
        train.fit(train.build_models(HEIGHT, WIDTH, chosen), pixels, empty, chosen)


def test_an_image_too_small_for_the_blocks_is_a_clear_error(params: dict[str, Any]) -> None:
    chosen = settings(params, filters=[8, 8, 8, 8, 8])
    with pytest.raises(common.UserError, match="too small for 5 pooling blocks"):
        train.build_models(HEIGHT, WIDTH, chosen)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("model", "gan", "train.model = 'gan' is not allowed; allowed: simple_conv"),
        ("loss", "l1", "train.loss = 'l1' is not allowed; allowed: bce, mse"),
        ("filters", [64, 0], "train.filters = [64, 0] is not allowed"),
        ("filters", 64, "expected a list of positive integers"),
        ("epochs", 0, "train.epochs = 0 is not allowed; expected an integer >= 1"),
        ("learning_rate", "fast", "train.learning_rate = 'fast' is not allowed"),
        ("encoder", "pretrained", "a pretrained encoder needs a local weights file"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(
    params: dict[str, Any], key: str, value: Any, words: str
) -> None:
    params["train"][key] = value
    with pytest.raises(common.UserError) as error:
        train.TrainParams.from_params(params)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_pretrained_network_is_refused(params: dict[str, Any]) -> None:
    params["train"]["pretrained"]["name"] = "AlexNet"
    with pytest.raises(common.UserError, match=re.escape("train.pretrained.name = 'AlexNet'")):
        train.TrainParams.from_params(params)


def test_batches_shuffle_reproducibly_and_cover_every_row(pixels: np.ndarray) -> None:
    batches = train.PixelBatches(pixels, np.arange(10, 40), batch_size=8, seed=3)
    again = train.PixelBatches(pixels, np.arange(10, 40), batch_size=8, seed=3)
    first_epoch = [batches[index][0] for index in range(len(batches))]
    assert sum(len(batch) for batch in first_epoch) == 30
    np.testing.assert_array_equal(
        np.concatenate(first_epoch),
        np.concatenate([again[index][0] for index in range(len(again))]),
    )
    batches.on_epoch_end()
    assert not np.array_equal(batches[0][0], first_epoch[0]), "a new order each epoch"
    assert first_epoch[0].dtype == np.float32 and first_epoch[0].max() <= 1.0


def test_a_git_repository_without_a_commit_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.UserError, match=re.escape("commit the project first")):
        train.open_live()
