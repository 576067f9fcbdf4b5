"""The trained encoder at run time: LiteRT (the default) or Keras (`embed.runtime`).

Training needs TensorFlow; encoding does not. Importing TensorFlow takes 2-6 s and
700 MB in every process that encodes (embed, describe, the similar command, each Dask
worker), which on a daily run of a few hundred new images is most of embed's time. So
the encoder is converted once, per encoder file, to a LiteRT flatbuffer kept in
data/cache/embed/litert/ (named by the encoder file's sha256), and every image is encoded
by LiteRT's interpreter (XNNPACK kernels): a 0.1 s import, and on this project's conv
encoder about twice TensorFlow's speed on a CPU. Its values differ from Keras's by about
1e-6, the same way for every image: a project encodes every image with one runtime, and
the runtime is part of embed's cache key.

`keras` runs the encoder with Keras itself: for Dask workers with GPUs (LiteRT runs on the
CPU) and for anyone who wants TensorFlow's own numbers.

Every runtime pads each batch to the batch size, so an image gets the same vector
whichever images it is encoded with (the caches rely on it).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from stages import common, native_logs
from stages.content_cache import file_key

Runtime = Literal["litert", "keras"]
LITERT_DIR = common.CACHE_DIR / "embed" / "litert"


class Encoder(Protocol):
    """An encoder ready to run: images (height x width x 3, uint8) to float32 vectors."""

    file: Path  # the file it runs (a Dask worker loads it again, with READERS[runtime])
    runtime: Runtime
    image_shape: tuple[int, ...]
    values: int  # values per image

    def encode(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Float32 (rows, values) of up to `batch_size` rows of uint8 pixels."""
        ...


def padded_batch(pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Up to `batch_size` rows of uint8 pixels as a float32 batch of 0-1 values, padded with
    zeros to `batch_size` rows."""
    if len(pixels) > batch_size:
        raise ValueError(f"{len(pixels)} rows for a batch of {batch_size}")
    images = np.zeros((batch_size, *pixels.shape[1:]), dtype=np.float32)
    images[: len(pixels)] = pixels.astype(np.float32) / 255.0
    return images


class LiteEncoder:
    """The encoder's LiteRT flatbuffer in an interpreter (one batch at a time: a lock keeps
    a Dask worker's threads from sharing the interpreter's buffers at once)."""

    runtime: Runtime = "litert"

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter  # 0.1 s; only where encoding

        # WORKERS caps the threads as it caps every stage's processes (no change in values).
        self.file = path
        self.interpreter = Interpreter(model_path=str(path), num_threads=common.worker_count())
        (tensor_in,) = self.interpreter.get_input_details()
        (tensor_out,) = self.interpreter.get_output_details()
        self.input_index = int(tensor_in["index"])
        self.output_index = int(tensor_out["index"])
        self.image_shape = tuple(int(size) for size in tensor_in["shape"][1:])
        self.values = math.prod(int(size) for size in tensor_out["shape"][1:])
        self.batch_size = 0
        self.lock = threading.Lock()

    def encode(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Float32 (rows, values) of up to `batch_size` rows of uint8 pixels."""
        images = padded_batch(pixels, batch_size)
        with self.lock:
            if batch_size != self.batch_size:
                self.interpreter.resize_tensor_input(self.input_index, list(images.shape))
                # LiteRT logs an INFO line as it applies XNNPACK here, whatever
                # TF_CPP_MIN_LOG_LEVEL says unless it was set before the process started.
                with native_logs.native_logs_filtered():
                    self.interpreter.allocate_tensors()
                self.batch_size = batch_size
            self.interpreter.set_tensor(self.input_index, images)
            self.interpreter.invoke()
            codes = self.interpreter.get_tensor(self.output_index)
        return np.array(codes, dtype=np.float32).reshape(batch_size, -1)[: len(pixels)]


class KerasEncoder:
    """The Keras encoder (TensorFlow loads with it)."""

    runtime: Runtime = "keras"

    def __init__(self, path: Path) -> None:
        from stages import embed  # Keras's loader and its checks

        self.file = path
        self.model = embed.read_encoder(path)
        self.image_shape = tuple(self.model.input_shape[1:])
        self.values = math.prod(self.model.output_shape[1:])

    def encode(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Float32 (rows, values) of up to `batch_size` rows of uint8 pixels."""
        from stages import embed

        return embed.predict_padded(self.model, pixels, batch_size).reshape(len(pixels), -1)


def litert_file(encoder_file: Path, folder: Path = LITERT_DIR, again: bool = False) -> Path:
    """The LiteRT flatbuffer of an encoder file, in `folder`, converted on first use
    (TensorFlow loads then, once per encoder), or `again`."""
    target = folder / f"{file_key(encoder_file)}.tflite"
    if again or not target.exists():
        from stages import embed

        model = embed.read_encoder(encoder_file)
        with common.atomic_output(target) as temporary:
            # Keras wants the .tflite ending; the atomic move gives the final name.
            named = temporary.with_name(temporary.name + ".tflite")
            try:
                model.export(str(named), format="litert", verbose=False)
                named.replace(temporary)
            finally:
                named.unlink(missing_ok=True)
    return target


def model_file(encoder_file: Path, runtime: Runtime, litert_folder: Path = LITERT_DIR) -> Path:
    """The file a runtime loads: the Keras file itself, or its LiteRT flatbuffer (kept in
    `litert_folder`)."""
    return litert_file(encoder_file, litert_folder) if runtime == "litert" else encoder_file


# What loads the file each runtime runs (model_file), for read_model and compute.load_once.
READERS: dict[str, type[LiteEncoder] | type[KerasEncoder]] = {
    "litert": LiteEncoder,
    "keras": KerasEncoder,
}


def read_model(encoder_file: Path, runtime: Runtime, litert_folder: Path) -> Encoder:
    """The encoder on `runtime`. A LiteRT file that does not load (damaged in the cache
    by a disk fault or by hand: conversions are written atomically) is converted again."""
    path = model_file(encoder_file, runtime, litert_folder)
    try:
        return READERS[runtime](path)
    except ValueError:  # LiteRT's "not a valid Flatbuffer buffer"
        if runtime != "litert":
            raise
        return LiteEncoder(litert_file(encoder_file, litert_folder, again=True))


def open_encoder(
    encoder_file: Path,
    image_shape: tuple[int, ...],
    runtime: Runtime,
    litert_folder: Path = LITERT_DIR,
) -> Encoder:
    """The encoder of `encoder_file` on `runtime`, checked to take images of
    `image_shape` (height, width, 3); LiteRT's flatbuffer is kept in `litert_folder`.
    Raises a UserError naming the file when it is missing, is not an encoder, or takes
    other images."""
    from stages import embed

    embed.check_encoder_file(encoder_file)
    try:
        encoder = read_model(encoder_file, runtime, litert_folder)
    except common.UserError:
        raise
    except Exception as error:  # a file that is not a Keras model, or from another version
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise common.UserError(f"cannot load the encoder {encoder_file}: {message}") from None
    embed.check_image_shape(encoder_file, encoder.image_shape, image_shape)
    return encoder


def runtime_key(runtime: Runtime) -> str:
    """What a cache of vectors adds to its name for the runtime that made them ('' for
    Keras, whose caches predate the choice)."""
    return "" if runtime == "keras" else f"-{runtime}"
