"""The models train builds: convolutional, dense and variational autoencoders, and frozen
Keras Applications CNNs as encoders. Keras alone, so any backend and a GPU serve.

`Models` holds what train fits, the encoder embed uses and the autoencoder that
reconstructs; every builder starts from a clean, seeded Keras state (`reset_keras`).
"""

from __future__ import annotations

import math
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stages import common
from stages.quiet_start import keras

# Keras Applications that work as frozen feature extractors here: the name, and how
# its pixels are scaled ("tf": -1..1, "torch": ImageNet mean/std, "raw": 0..255).
PRETRAINED = {
    "MobileNetV2": "tf",
    "MobileNetV3Small": "raw",
    "MobileNetV3Large": "raw",
    "EfficientNetB0": "raw",
    "ResNet50V2": "tf",
    "DenseNet121": "torch",
}
ModelKind = Literal["simple_conv", "simple", "vae", "conv_vae"]
MODELS: tuple[str, ...] = typing.get_args(ModelKind)
PretrainedName = Literal[tuple(PRETRAINED)]  # type: ignore[valid-type]
MINIMUM_PRETRAINED_INPUT = 32


@dataclass
class Models:
    """What a builder returns: the model to fit (None for a frozen encoder), the encoder
    embed uses, and the autoencoder that reconstructs (None for a frozen encoder)."""

    trainable: keras.Model | None
    encoder: keras.Model
    autoencoder: keras.Model | None


def reset_keras(seed: int) -> None:
    """Start from a clean Keras state: fresh layer names (so saved files are identical
    from run to run), seeded initializers and shuffles, deterministic TensorFlow ops."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def check_poolable(height: int, width: int, blocks: int) -> None:
    """Fail clearly when an image is too small for the pooling blocks."""
    if height >> blocks < 1 or width >> blocks < 1:
        raise common.UserError(
            f"images of {height}x{width} are too small for {blocks} pooling blocks "
            f"(train.filters): each halves the size; use fewer filters or a larger image.*"
        )


def conv_encoder_blocks(inputs: Any, filters: tuple[int, ...]) -> Any:
    """Conv 3x3 same -> BatchNorm -> ReLU -> MaxPool 2, once per filter count."""
    x = inputs
    for index, count in enumerate(filters, start=1):
        x = keras.layers.Conv2D(count, 3, padding="same", name=f"encoder_conv{index}")(x)
        x = keras.layers.BatchNormalization(name=f"encoder_norm{index}")(x)
        x = keras.layers.Activation("relu", name=f"encoder_relu{index}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"encoder_pool{index}")(x)
    return x


def conv_decoder_blocks(latent: Any, filters: tuple[int, ...], height: int, width: int) -> Any:
    """The encoder mirrored: Conv -> BatchNorm -> ReLU -> UpSample 2 per filter count,
    then a resize to the exact input size (odd sizes such as 27 do not double back) and a
    3x3 convolution to RGB with a sigmoid."""
    x = latent
    for index, count in enumerate(reversed(filters), start=1):
        x = keras.layers.Conv2D(count, 3, padding="same", name=f"decoder_conv{index}")(x)
        x = keras.layers.BatchNormalization(name=f"decoder_norm{index}")(x)
        x = keras.layers.Activation("relu", name=f"decoder_relu{index}")(x)
        x = keras.layers.UpSampling2D(2, name=f"decoder_up{index}")(x)
    x = keras.layers.Resizing(height, width, interpolation="bilinear", name="decoder_resize")(x)
    return keras.layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="reconstruction")(x)


def build_simple_conv(height: int, width: int, filters: tuple[int, ...]) -> Models:
    """The original's convolutional autoencoder: the latent is the last block's feature
    map (3x6x16 for a 27x48 input), flattened into the embedding."""
    check_poolable(height, width, len(filters))
    image = keras.Input((height, width, 3), name="image")
    latent = conv_encoder_blocks(image, filters)
    encoder = keras.Model(image, keras.layers.Flatten(name="latent")(latent), name="encoder")
    reconstruction = conv_decoder_blocks(latent, filters, height, width)
    autoencoder = keras.Model(image, reconstruction, name="autoencoder")
    return Models(autoencoder, encoder, autoencoder)


def build_simple(height: int, width: int, latent_dim: int) -> Models:
    """A dense autoencoder: flatten -> 512 -> latent_dim -> 512 -> image."""
    size = height * width * 3
    image = keras.Input((height, width, 3), name="image")
    x = keras.layers.Flatten(name="encoder_flatten")(image)
    x = keras.layers.Dense(512, activation="relu", name="encoder_dense")(x)
    latent = keras.layers.Dense(latent_dim, name="latent")(x)
    encoder = keras.Model(image, latent, name="encoder")
    code = keras.Input((latent_dim,), name="code")
    y = keras.layers.Dense(512, activation="relu", name="decoder_dense")(code)
    y = keras.layers.Dense(size, activation="sigmoid", name="decoder_pixels")(y)
    y = keras.layers.Reshape((height, width, 3), name="reconstruction")(y)
    decoder = keras.Model(code, y, name="decoder")
    autoencoder = keras.Model(image, decoder(encoder(image)), name="autoencoder")
    return Models(autoencoder, encoder, autoencoder)


@keras.saving.register_keras_serializable(package="smart_iss_posts")
class GaussianSample(keras.layers.Layer):
    """Draws z = mean + exp(log_var / 2) * noise and adds the KL divergence to N(0, 1) as a
    loss, scaled per image value so it weighs like a mean reconstruction loss."""

    def __init__(self, values_per_image: int, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.values_per_image = values_per_image
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: list[Any]) -> Any:
        mean, log_var = inputs
        divergence = -0.5 * keras.ops.sum(
            1 + log_var - keras.ops.square(mean) - keras.ops.exp(log_var), axis=-1
        )
        self.add_loss(keras.ops.mean(divergence) / self.values_per_image)
        noise = keras.random.normal(keras.ops.shape(mean), seed=self.seed_generator)
        return mean + keras.ops.exp(0.5 * log_var) * noise

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "values_per_image": self.values_per_image,
            "seed": self.seed,
        }


def build_vae(
    height: int,
    width: int,
    latent_dim: int,
    filters: tuple[int, ...],
    convolutional: bool,
    seed: int,
) -> Models:
    """A variational autoencoder, dense (vae) or convolutional (conv_vae).

    The saved encoder gives the mean of the latent distribution, so embeddings are
    deterministic; the saved autoencoder reconstructs from that mean.
    """
    image = keras.Input((height, width, 3), name="image")
    if convolutional:
        check_poolable(height, width, len(filters))
        feature_map = conv_encoder_blocks(image, filters)
        map_shape = tuple(feature_map.shape[1:])
        x = keras.layers.Flatten(name="encoder_flatten")(feature_map)
    else:
        x = keras.layers.Flatten(name="encoder_flatten")(image)
        x = keras.layers.Dense(512, activation="relu", name="encoder_dense")(x)
    mean = keras.layers.Dense(latent_dim, name="latent_mean")(x)
    log_var = keras.layers.Dense(latent_dim, name="latent_log_var")(x)
    encoder = keras.Model(image, mean, name="encoder")

    code = keras.Input((latent_dim,), name="code")
    if convolutional:
        y = keras.layers.Dense(math.prod(map_shape), activation="relu", name="decoder_dense")(code)
        y = keras.layers.Reshape(map_shape, name="decoder_map")(y)
        y = conv_decoder_blocks(y, filters, height, width)
    else:
        y = keras.layers.Dense(512, activation="relu", name="decoder_dense")(code)
        y = keras.layers.Dense(height * width * 3, activation="sigmoid", name="decoder_pixels")(y)
        y = keras.layers.Reshape((height, width, 3), name="reconstruction")(y)
    decoder = keras.Model(code, y, name="decoder")

    sample = GaussianSample(height * width * 3, seed=seed, name="sample")([mean, log_var])
    trainable = keras.Model(image, decoder(sample), name="vae")
    autoencoder = keras.Model(image, decoder(encoder(image)), name="autoencoder")
    return Models(trainable, encoder, autoencoder)


def build_pretrained(height: int, width: int, name: str, weights: str | None, size: int) -> Models:
    """A frozen Keras Applications CNN with global average pooling as the encoder.

    Images are scaled up to input_size x input_size and to the CNN's pixel range inside
    the model. Weights come from a local file, or from the internet for `imagenet`.
    """
    if weights != "imagenet":
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise common.UserError(
                f"train.pretrained.weights: file {path} does not exist "
                "(give a local weights file, or imagenet to download them)"
            )
        weights = str(path)
    application = getattr(keras.applications, name)
    # Keras warns once per layer before failing on weights of another network: keep its
    # warnings back, and pass them on only if the weights load.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            backbone = application(
                include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg"
            )
        except (ValueError, OSError) as error:
            message = str(error).splitlines()[0]
            raise common.UserError(
                f"train.pretrained.weights: cannot load {weights} into {name}: {message}"
            ) from None
    for warning in held:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    backbone.trainable = False
    image = keras.Input((height, width, 3), name="image")
    x = keras.layers.Resizing(size, size, interpolation="bilinear", name="pretrained_resize")(image)
    scaling = PRETRAINED[name]
    if scaling == "tf":
        x = keras.layers.Rescaling(2.0, offset=-1.0, name="pretrained_scale")(x)
    elif scaling == "torch":
        x = keras.layers.Normalization(
            mean=[0.485, 0.456, 0.406],
            variance=[0.229**2, 0.224**2, 0.225**2],
            name="pretrained_scale",
        )(x)
    else:
        x = keras.layers.Rescaling(255.0, name="pretrained_scale")(x)
    encoder = keras.Model(image, backbone(x, training=False), name="encoder")
    return Models(None, encoder, None)
