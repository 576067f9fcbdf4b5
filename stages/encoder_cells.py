"""Dense learned local features (`words.detector: encoder`): the cells of the last
convolutional feature map of the encoder train made, in the spirit of DELF, with no new
weights.

An image's keypoints are the cells of that map for its prepared pixels (what embed
encodes): each cell's channels are its descriptor, its centre its place (shares of the
model input's width and height), one cell its size. The `max_keypoints` cells of
strongest response (the descriptor's length) are kept. A convolutional autoencoder
(simple_conv, conv_vae) gives its last block's map (3x6 cells of 16 channels for 27x48
frames); a pretrained CNN the map before its pooling (MobileNetV2 at 224 px: 7x7 cells of
1280). Dense encoders (simple, vae) have no map and are refused.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages import common, descriptors, embed, parts
from stages.content_cache import file_key
from stages.quiet_start import keras

BATCH = 256  # images through the encoder at once


def feature_map_model(encoder: keras.Model) -> keras.Model:
    """A model from the encoder's input to its last convolutional feature map."""
    for index, layer in enumerate(encoder.layers):
        if isinstance(layer, keras.Model):  # a pretrained backbone, pooled at its end
            below = keras.Model(encoder.input, encoder.layers[index - 1].output)
            inner = keras.Model(layer.input, layer.layers[-2].output)
            image = keras.Input(encoder.input_shape[1:])
            return keras.Model(image, inner(below(image)))
    maps = [layer for layer in encoder.layers[1:] if len(layer.output.shape) == 4]
    if not maps:
        raise common.UserError(
            "words.detector: encoder needs a convolutional encoder (train.model simple_conv "
            "or conv_vae, or train.encoder pretrained); this one has no feature map"
        )
    return keras.Model(encoder.input, maps[-1].output)


def cell_keypoints(maps: np.ndarray, max_keypoints: int) -> list:
    """Each image's keypoints from its feature map (images x height x width x channels):
    the strongest `max_keypoints` cells, strongest first, ties by place."""
    from stages.words import Keypoints  # words imports this module

    _, height, width, channels = maps.shape
    rows, columns = np.divmod(np.arange(height * width), width)
    places = np.column_stack(
        [(columns + 0.5) / width, (rows + 0.5) / height, np.full(len(rows), 1 / max(height, width))]
    ).astype(np.float32)
    found = []
    for cells in maps.reshape(len(maps), height * width, channels).astype(np.float32):
        strength = np.sqrt((cells.astype(np.float64) ** 2).sum(axis=1))
        order = np.lexsort((columns, rows, -strength))[:max_keypoints]
        found.append(Keypoints(places[order], cells[order]))
    return found


def detector_key() -> dict[str, str]:
    """What encoder cells depend on besides the image: the encoder file and the decode
    settings of the pixels."""
    if descriptors.read_spec().get("encoder") == "bovw":
        raise common.UserError(
            "words.detector: encoder needs the encoder train makes, and train.encoder: bovw "
            "makes none: use words.detector sift or orb with bovw"
        )
    _, _, pixels_key = common.read_image_keys()
    return {"encoder": file_key(common.ENCODER_FILE), "pixels": pixels_key}


def pixel_keypoints(pixels: parts.PixelRows, rows: np.ndarray, max_keypoints: int) -> list:
    """Keypoints of the given rows of an array of prepared pixels (the collection's, or
    one query image's), BATCH images through the encoder at a time."""
    model = feature_map_model(embed.load_encoder(common.ENCODER_FILE, pixels.shape[1:]))
    found: list = []
    for at in range(0, len(rows), BATCH):
        maps = embed.predict_padded(model, pixels[rows[at : at + BATCH]], BATCH)
        found.extend(cell_keypoints(maps, max_keypoints))
    return found


def table_keypoints(table: pd.DataFrame, rows: list[int], max_keypoints: int) -> list:
    """Keypoints of the given rows of a table of images (id, ...), from their prepared
    pixels."""
    ids, pixels = parts.load_pixels()
    wanted = pd.Index(ids).get_indexer(table["id"].to_numpy()[rows])
    if (wanted < 0).any():
        raise common.UserError(f"{common.PIXELS_DIR} lacks images of the manifest: run `dvc repro`")
    return pixel_keypoints(pixels, wanted, max_keypoints)
