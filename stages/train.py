"""train: learn the latent space every image is embedded in.

Params:  TrainParams below (params.yaml, section train)
Inputs:  data/interim/pixels/, data/interim/ids.parquet, data/processed/split.parquet
Outputs: models/autoencoder/encoder.keras      image -> latent vector (what embed uses)
         models/autoencoder/autoencoder.keras  image -> reconstruction (trained kinds)
         models/autoencoder/spec.json          what the encoder expects and gives
         metrics/train/                        DVCLive's folder:
           metrics.json                        final losses (best epoch), epochs, sizes
           plots/metrics/{train,eval}/loss.tsv the loss per epoch (step 0 is epoch 1)
           plots/images/reconstructions.png    inputs above their reconstructions

Training fits the `train` subset, stops early on the `valid` loss (keeping the best
weights) and reports the loss on `test`. The model code uses Keras alone, so it runs on
any Keras backend and on a GPU when one is present. With `encoder: bovw` nothing is
trained and only the spec is written: an image is its bag of visual words, which the
describe stage weighs.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field, model_validator

from stages import common, parts, settings
from stages.autoencoders import (
    MINIMUM_PRETRAINED_INPUT,
    ModelKind,
    Models,
    PretrainedName,
    build_pretrained,
    build_simple,
    build_simple_conv,
    build_vae,
    reset_keras,
)
from stages.quiet_start import keras  # isort: split

from dvclive import Live
from dvclive.keras import DVCLiveCallback
from scmrepo.exceptions import SCMError

STAGE = "train"
PREVIEW_IMAGES = 8
PREVIEW_WIDTH = 960  # pixels across the reconstruction preview
KERAS_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

AUTOENCODER_FILE = common.AUTOENCODER_DIR / "autoencoder.keras"
SPEC_FILE = common.AUTOENCODER_DIR / "spec.json"
LIVE_DIR = common.METRICS_DIR / "train"  # DVCLive writes metrics, curves and images here
PREVIEW_IMAGE = "reconstructions.png"


class PretrainedParams(settings.Section):
    """params.yaml, section train.pretrained: the frozen CNN of encoder: pretrained."""

    name: PretrainedName = Field("MobileNetV2", description="the Keras Applications CNN")
    weights: str | None = Field(
        None,
        description="a local weights file (.h5 / .weights.h5), or imagenet (downloads: "
        "needs internet)",
    )
    input_size: int = Field(
        96, ge=MINIMUM_PRETRAINED_INPUT, description="images are scaled to this square, px"
    )


class TrainParams(settings.Section):
    """params.yaml, section train."""

    SECTION: ClassVar[str] = "train"
    encoder: Literal["autoencoder", "pretrained", "bovw"] = Field(
        "autoencoder",
        description="autoencoder: train one; pretrained: a frozen Keras Applications CNN; "
        "bovw: bags of visual words (the words stage's), TF-IDF weighted",
    )
    model: ModelKind = Field(
        "simple_conv", description="the autoencoder: convolutional, dense, or variational"
    )
    filters: list[Annotated[int, Field(gt=0)]] = Field(
        [64, 32, 16],
        min_length=1,
        description="filters of the convolution blocks, outermost first; each block halves "
        "the size (27x48 -> 3x6x16)",
        json_schema_extra={"allowed": "expected a list of positive integers, such as [64, 32, 16]"},
    )
    latent_dim: int = Field(288, ge=1, description="latent size of simple, vae and conv_vae")
    loss: Literal["bce", "mse"] = Field(
        "bce", description="reconstruction loss (bce: the original's)"
    )
    learning_rate: float = Field(
        0.001, ge=1e-8, le=10, allow_inf_nan=False, description="Adam's learning rate"
    )
    epochs: int = Field(20, ge=1, description="the most epochs")
    batch_size: int = Field(64, ge=1, description="images per step")
    patience: int = Field(
        5, ge=0, description="stop after this many epochs without a better val_loss"
    )
    sample: int = Field(
        5000,
        ge=1,
        description="train, validate and test on at most this many images each (seeded), "
        "so that training costs the same for a million images as for 10,000",
    )
    seed: int = Field(42, ge=0, description="seed of weights, shuffling and sampling")
    pretrained: PretrainedParams = Field(default_factory=PretrainedParams)

    @model_validator(mode="after")
    def pretrained_needs_weights(self) -> TrainParams:
        """A pretrained encoder cannot run without its weights."""
        if self.encoder == "pretrained" and not self.pretrained.weights:
            raise settings.param_error(
                "train.pretrained.weights",
                self.pretrained.weights,
                "a pretrained encoder needs a local weights file (or imagenet to download them)",
            )
        return self


def build_models(height: int, width: int, params: TrainParams) -> Models:
    """Build the models the params ask for, from a clean, seeded Keras state."""
    reset_keras(params.seed)
    if params.encoder == "pretrained":
        pretrained = params.pretrained
        return build_pretrained(
            height, width, pretrained.name, pretrained.weights, pretrained.input_size
        )
    if params.model == "simple_conv":
        return build_simple_conv(height, width, params.filters)
    if params.model == "simple":
        return build_simple(height, width, params.latent_dim)
    return build_vae(
        height,
        width,
        params.latent_dim,
        params.filters,
        convolutional=params.model == "conv_vae",
        seed=params.seed,
    )


# ----------------------------------------------------------------------------- training


class PixelBatches(keras.utils.PyDataset):
    """Batches of (image, image) in 0..1 from rows of a uint8 pixel array.

    Only one batch is converted to float at a time, so memory stays at the uint8 array.
    With a seed, the rows are shuffled afresh, and reproducibly, every epoch.
    """

    def __init__(
        self, pixels: parts.PixelRows, rows: np.ndarray, batch_size: int, seed: int | None = None
    ) -> None:
        super().__init__()
        self.pixels = pixels
        self.rows = np.asarray(rows)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if self.seed is None:
            return self.rows
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        images = self.pixels[rows].astype(np.float32) / 255.0
        return images, images

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._order()


def subset_rows(
    split: pd.DataFrame, ids: list[str], sample: int, seed: int
) -> dict[str, np.ndarray]:
    """Row numbers of the pixel array in each subset (train, valid, test), each a seeded
    sample of at most `sample` rows, in row order."""
    subset_of = split.set_index("id")["subset"]
    subsets = subset_of.reindex(ids).to_numpy()
    if pd.isna(subsets).any():
        raise common.UserError("the split does not cover every image: run `dvc repro split`")
    rows = {name: np.flatnonzero(subsets == name) for name in ("train", "valid", "test")}
    return {
        name: found[common.sample_rows(len(found), sample, seed)] for name, found in rows.items()
    }


@dataclass
class TrainResult:
    """What training gave: the per-epoch history and the final figures."""

    history: pd.DataFrame  # epoch, loss, val_loss
    metrics: dict[str, Any]


def reconstruction_loss(name: str) -> keras.losses.Loss:
    """The Keras loss for a train.loss name."""
    if name == "bce":
        return keras.losses.BinaryCrossentropy(name="bce")
    return keras.losses.MeanSquaredError(name="mse")


def fit(
    models: Models,
    pixels: parts.PixelRows,
    rows: dict[str, np.ndarray],
    params: TrainParams,
    live: Live | None = None,
) -> TrainResult:
    """Fit the trainable model on the train rows; keep the weights of the best epoch.

    Early stopping watches val_loss, or the training loss when the valid subset is empty.
    A frozen pretrained encoder is not fitted. With `live`, DVCLive's Keras callback logs
    train/loss and eval/loss at every epoch.
    """
    parameters = int(models.encoder.count_params())
    latent_dim = int(math.prod(models.encoder.output_shape[1:]))
    base = {"parameters": parameters, "latent_dim": latent_dim}
    if models.trainable is None:
        history = pd.DataFrame(columns=["epoch", "loss", "val_loss"])
        empty = {"loss": None, "val_loss": None, "test_loss": None, "epochs": 0, "best_epoch": 0}
        return TrainResult(history, {**base, **empty})
    if len(rows["train"]) == 0:
        raise common.UserError(
            "the train subset is empty: raise split.proportions.train or add images"
        )
    model = models.trainable
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=params.learning_rate),
        loss=reconstruction_loss(params.loss),
    )
    keras.utils.set_random_seed(params.seed)
    train_batches = PixelBatches(pixels, rows["train"], params.batch_size, seed=params.seed)
    has_valid = len(rows["valid"]) > 0
    valid_batches = PixelBatches(pixels, rows["valid"], params.batch_size) if has_valid else None
    monitor = "val_loss" if has_valid else "loss"
    stopper = keras.callbacks.EarlyStopping(
        monitor=monitor, patience=params.patience, restore_best_weights=True
    )
    fitted = model.fit(
        train_batches,
        validation_data=valid_batches,
        epochs=params.epochs,
        callbacks=[stopper, *([DVCLiveCallback(live=live)] if live is not None else [])],
        verbose=0,
        shuffle=False,  # the batches shuffle themselves, reproducibly
    )
    losses = fitted.history
    history = pd.DataFrame(
        {
            "epoch": range(1, len(losses["loss"]) + 1),
            "loss": losses["loss"],
            "val_loss": losses.get("val_loss", [None] * len(losses["loss"])),
        }
    )
    best = int(np.nanargmin(history[monitor].astype(float).to_numpy()))
    test_loss = None
    if len(rows["test"]):
        test_loss = float(
            model.evaluate(PixelBatches(pixels, rows["test"], params.batch_size), verbose=0)
        )
    metrics = {
        **base,
        "loss": round_metric(history["loss"][best]),
        "val_loss": round_metric(history["val_loss"][best]),
        "test_loss": round_metric(test_loss),
        "epochs": len(history),
        "best_epoch": best + 1,
    }
    return TrainResult(history, metrics)


def round_metric(value: Any) -> float | None:
    """A loss for metrics JSON: 6 significant digits, None when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(f"{float(value):.6g}")


# ----------------------------------------------------------------------------- outputs


def renumber_shared_objects(config: Any, numbers: dict[int, int] | None = None) -> Any:
    """Replace Keras's `shared_object_id`s (memory addresses, new in every process) by
    0, 1, 2... in order of first appearance; objects that were shared stay shared."""
    numbers = {} if numbers is None else numbers
    if isinstance(config, dict):
        return {
            key: numbers.setdefault(value, len(numbers))
            if key == "shared_object_id"
            else renumber_shared_objects(value, numbers)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [renumber_shared_objects(value, numbers) for value in config]
    return config


def save_model(model: keras.Model, path: Path) -> None:
    """Save a .keras file whose bytes depend only on the model.

    Keras stamps the save time into metadata.json and the zip entries, and memory
    addresses into config.json; all are made constant, so identical training runs give
    identical files and DVC reruns nothing downstream.
    """
    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "model.keras"
        model.save(saved)
        buffer = io.BytesIO()
        with zipfile.ZipFile(saved) as source, zipfile.ZipFile(buffer, "w") as target:
            for entry in source.infolist():
                data = source.read(entry.filename)
                if entry.filename == "metadata.json":
                    metadata = json.loads(data)
                    metadata.pop("date_saved", None)
                    data = json.dumps(metadata, sort_keys=True).encode("utf-8")
                elif entry.filename == "config.json":
                    config = renumber_shared_objects(json.loads(data))
                    data = json.dumps(config, sort_keys=True).encode("utf-8")
                info = zipfile.ZipInfo(entry.filename, date_time=KERAS_ZIP_TIME)
                info.compress_type = entry.compress_type
                info.external_attr = 0o644 << 16
                target.writestr(info, data)
        common.write_bytes_atomic(buffer.getvalue(), path)


def preview_image(
    autoencoder: keras.Model | None, pixels: parts.PixelRows, rows: np.ndarray
) -> Image.Image:
    """A row of input images above their reconstructions (inputs only without a decoder)."""
    # Spread over the subset: rows follow file paths, so the first few are often alike.
    chosen = rows[np.linspace(0, len(rows) - 1, min(PREVIEW_IMAGES, len(rows))).astype(int)]
    originals = pixels[chosen]
    strips = [np.concatenate(list(originals), axis=1)]
    if autoencoder is not None:
        rebuilt = autoencoder.predict_on_batch(originals.astype(np.float32) / 255.0)
        rebuilt = np.clip(np.rint(np.asarray(rebuilt) * 255.0), 0, 255).astype(np.uint8)
        strips.append(np.concatenate(list(rebuilt), axis=1))
    sheet = Image.fromarray(np.concatenate(strips, axis=0))
    scale = max(1, PREVIEW_WIDTH // sheet.width)
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST)


def keras_spec(models: Models, params: TrainParams, latent_dim: int) -> dict[str, Any]:
    """What a Keras encoder expects and gives, for spec.json."""
    return {
        "encoder": params.encoder,
        "model": params.model if params.encoder == "autoencoder" else params.pretrained.name,
        "input_shape": list(models.encoder.input_shape[1:]),
        "latent_dim": latent_dim,
    }


def write_models(models: Models | None, spec: dict[str, Any]) -> None:
    """Write the models (none for bovw) and the spec."""
    with common.replace_folder(common.AUTOENCODER_DIR) as staging:
        if models is not None:
            save_model(models.encoder, staging / common.ENCODER_FILE.name)
            if models.autoencoder is not None:
                save_model(models.autoencoder, staging / AUTOENCODER_FILE.name)
        (staging / SPEC_FILE.name).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def log_results(live: Live, result: TrainResult, preview: Image.Image) -> None:
    """The final metrics and the reconstruction preview, through DVCLive.

    The metrics are those of the best epoch, whose weights the model keeps, so the
    last epoch's values the callback left in the summary are dropped.
    """
    for name in ("train", "eval"):
        live.summary.pop(name, None)
    for name, value in result.metrics.items():
        if value is not None:  # DVCLive takes numbers only: a figure that does not apply
            live.log_metric(name, value, plot=False)
    live.log_image(PREVIEW_IMAGE, preview)


def open_live() -> Live:
    """DVCLive's logger for this run, in metrics/train.

    DVCLive stops with a traceback in a git repository that has no commit yet; that is
    one line saying what to do instead.
    """
    try:
        return Live(dir=str(LIVE_DIR), dvcyaml=None, save_dvc_exp=False)
    except SCMError as error:
        raise common.UserError(
            f"DVCLive cannot log in this git repository ({error}): commit the project "
            "first (git add -A && git commit -m start), then run again"
        ) from None


def main() -> None:
    """Read params, the pixels and the split; train (nothing for bovw); write the models
    and metrics."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = TrainParams.from_params(settings.load_params())
    ids, pixels = parts.load_pixels()
    split = common.read_parquet(common.SPLIT_FILE, made_by="split")
    rows = subset_rows(split, ids, params.sample, params.seed)
    height, width = pixels.shape[1:3]
    preview_rows = next(rows[name] for name in ("test", "valid", "train") if len(rows[name]))
    with open_live() as live:
        if params.encoder == "bovw":  # nothing to train: describe weighs the words
            models, spec = None, {"encoder": "bovw"}
            result = TrainResult(pd.DataFrame(columns=["epoch", "loss", "val_loss"]), {})
        else:
            models = build_models(height, width, params)
            result = fit(models, pixels, rows, params, live)
            spec = keras_spec(models, params, result.metrics["latent_dim"])
        write_models(models, spec)
        autoencoder = models.autoencoder if models is not None else None
        log_results(live, result, preview_image(autoencoder, pixels, preview_rows))
    metrics = result.metrics
    if params.encoder == "bovw":
        logger.info("bovw: nothing to train, the describe stage weighs the visual words")
        return
    logger.info(
        "%s on %d train / %d valid / %d test images of %dx%d: %d epochs (best %d), "
        "loss %s, val_loss %s, test_loss %s; latent %d values, %d encoder parameters; "
        "backend %s; %.1f s",
        params.model if params.encoder == "autoencoder" else params.pretrained.name,
        len(rows["train"]),
        len(rows["valid"]),
        len(rows["test"]),
        height,
        width,
        metrics["epochs"],
        metrics["best_epoch"],
        metrics["loss"],
        metrics["val_loss"],
        metrics["test_loss"],
        metrics["latent_dim"],
        metrics["parameters"],
        keras.backend.backend(),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
