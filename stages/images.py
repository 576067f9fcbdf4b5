"""Image decoding shared by the stages: EXIF orientation, any mode to RGB, JPEG DCT
scaling, and fitting to a target size by squashing, cropping or padding."""

from __future__ import annotations

import hashlib
import io
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

# We check the pixel count ourselves (sync.max_pixels) and reject with a clear reason;
# Pillow's own guard would raise or warn from deep inside a decoder instead.
Image.MAX_IMAGE_PIXELS = None

FitMode = Literal["squash", "crop", "pad"]  # how another aspect ratio is fitted
FIT_MODES: tuple[str, ...] = typing.get_args(FitMode)
EXIF_ORIENTATION_TAG = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageSize:
    """A target size in pixels, and how a different aspect ratio is reconciled."""

    height: int
    width: int
    fit: str = "squash"


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright) of an opened image; 1 when absent or unreadable."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not make a good image unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied."""
    width, height = image.size
    if exif_orientation(image) in ROTATED_ORIENTATIONS:
        return height, width
    return width, height


def upright(image: Image.Image) -> Image.Image:
    """An opened image turned as its EXIF orientation says (itself when upright or unknown)."""
    return image if exif_orientation(image) == 1 else ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    16-bit and 32-bit integer images are scaled down from the 16-bit range (a plain
    convert would clip them to white); transparent images are laid on black.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        levels = np.asarray(image).astype(np.int64)
        gray = np.clip(levels >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        gray = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0, 255)
        return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _scaled_size(width: int, height: int, target: ImageSize) -> tuple[int, int]:
    """The size the whole image is scaled to before cropping or padding to `target`."""
    if target.fit == "squash":
        return target.width, target.height
    scale_x, scale_y = target.width / width, target.height / height
    scale = max(scale_x, scale_y) if target.fit == "crop" else min(scale_x, scale_y)
    return max(1, round(width * scale)), max(1, round(height * scale))


def draft_request(
    stored_size: tuple[int, int], orientation: int, targets: Iterable[ImageSize]
) -> tuple[int, int]:
    """The smallest (width, height) a JPEG may be DCT-scaled to and still serve every target.

    `stored_size` and the answer are in the file's stored orientation, which is what
    `Image.draft` works in; the targets are upright.
    """
    rotated = orientation in ROTATED_ORIENTATIONS
    width, height = stored_size[::-1] if rotated else stored_size
    needed_width = needed_height = 1
    for target in targets:
        scaled_width, scaled_height = _scaled_size(width, height, target)
        needed_width = max(needed_width, scaled_width)
        needed_height = max(needed_height, scaled_height)
    return (needed_height, needed_width) if rotated else (needed_width, needed_height)


def fit_image(image: Image.Image, target: ImageSize) -> np.ndarray:
    """Resize an RGB image to target.height x target.width x 3 uint8 with a box filter.

    squash stretches to the target; crop scales to cover it and cuts the center;
    pad scales to fit inside it and centers the image on black.
    """
    width, height = image.size
    size = (target.width, target.height)
    if target.fit == "squash":
        resized = image.resize(size, Image.Resampling.BOX)
    elif target.fit == "crop":
        target_aspect = target.width / target.height
        if width / height > target_aspect:
            crop_width = height * target_aspect
            box = ((width - crop_width) / 2, 0.0, (width + crop_width) / 2, float(height))
        else:
            crop_height = width / target_aspect
            box = (0.0, (height - crop_height) / 2, float(width), (height + crop_height) / 2)
        resized = image.resize(size, Image.Resampling.BOX, box=box)
    elif target.fit == "pad":
        inner = _scaled_size(width, height, target)
        inner = (min(inner[0], target.width), min(inner[1], target.height))
        resized = Image.new("RGB", size, (0, 0, 0))
        offset = ((target.width - inner[0]) // 2, (target.height - inner[1]) // 2)
        resized.paste(image.resize(inner, Image.Resampling.BOX), offset)
    else:
        raise ValueError(f"unknown fit {target.fit!r}; allowed: {', '.join(FIT_MODES)}")
    return np.asarray(resized, dtype=np.uint8)


def decode_for_targets(data: bytes, targets: list[ImageSize]) -> list[np.ndarray]:
    """Decode image bytes once, upright and RGB, and return one array per target size.

    JPEGs are decoded with DCT scaling (`Image.draft`) to the smallest size that still
    serves every target, which is several times faster than a full-size decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        orientation = exif_orientation(image)
        image.draft("RGB", draft_request(image.size, orientation, targets))
        rgb = to_rgb(upright(image))
        return [fit_image(rgb, target) for target in targets]


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of some bytes: the content key of every image."""
    return hashlib.sha256(data).hexdigest()
