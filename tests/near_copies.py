"""A collection built to check near-duplicate search and quality flags: photo-like scenes,
each with resized, small (a quarter of each side), re-encoded, cropped, brightened and
mirrored copies, and unrelated
scenes that look alike (the same colours, other content)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

SIZE = (320, 180)
COPY_KINDS = ("resized", "small", "quality60", "cropped", "brighter", "mirrored")


def scene(seed: int, palette_seed: int | None = None, size: tuple[int, int] = SIZE) -> Image.Image:
    """A photo-like scene drawn from `seed`: a smooth colour field, shapes, lines and sensor
    noise, in the five colours of `palette_seed` (the seed itself by default)."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(seed if palette_seed is None else palette_seed).integers(
        0, 256, (5, 3)
    )
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    field = np.zeros((height, width, 3))
    for _ in range(6):
        center_x, center_y = rng.random(), rng.random() * height / width
        radius = 0.1 + 0.3 * rng.random()
        weight = np.exp(-((x - center_x) ** 2 + (y - center_y) ** 2) / (2 * radius**2))
        field += weight[..., None] * palette[rng.integers(0, 5)]
    image = Image.fromarray((field / max(field.max(), 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    def colour() -> tuple[int, ...]:
        return tuple(int(c) for c in palette[rng.integers(0, 5)])

    for _ in range(8):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (
            left,
            top,
            left + int(rng.integers(10, width // 2)),
            top + int(rng.integers(10, height // 2)),
        )
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour())
    for _ in range(5):
        points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)]
        draw.line(points, fill=colour(), width=3)
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """An image as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def copies(image: Image.Image) -> dict[str, bytes]:
    """The near-copies of an image, by kind (COPY_KINDS)."""
    width, height = image.size
    margin_x, margin_y = round(width * 0.025), round(height * 0.025)  # 5% cropped in all
    return {
        "resized": jpeg(image.resize((width // 2, height // 2), Image.Resampling.LANCZOS)),
        "small": jpeg(image.resize((width // 4, height // 4), Image.Resampling.LANCZOS)),
        "quality60": jpeg(image, 60),
        "cropped": jpeg(image.crop((margin_x, margin_y, width - margin_x, height - margin_y))),
        "brighter": jpeg(ImageEnhance.Brightness(image).enhance(1.25)),
        "mirrored": jpeg(ImageOps.mirror(image)),
    }


def near_copy_files(bases: int = 12) -> tuple[dict[str, bytes], dict[str, str]]:
    """Files (name -> JPEG bytes) and the truth (name -> its base's name, or itself for an
    unrelated look-alike): `bases` scenes with their copies, and one look-alike per scene."""
    files: dict[str, bytes] = {}
    truth: dict[str, str] = {}
    for index in range(bases):
        base = scene(index)
        name = f"scene-{index:02d}"
        files[f"{name}.jpg"] = jpeg(base)
        truth[f"{name}.jpg"] = name
        for kind, data in copies(base).items():
            files[f"{name}-{kind}.jpg"] = data
            truth[f"{name}-{kind}.jpg"] = name
        alike = f"alike-{index:02d}.jpg"  # scene index's colours, other shapes
        files[alike] = jpeg(scene(1000 + index, palette_seed=index))
        truth[alike] = alike
    return files, truth


def planted_quality_files() -> dict[str, tuple[bytes, str | None]]:
    """Files (name -> bytes, the flag each should raise; None for clean ones)."""
    clean = scene(7)
    flat = Image.new("RGB", SIZE, (200, 200, 200))
    ImageDraw.Draw(flat).text((10, 10), "nearly empty", fill=(40, 40, 40))
    washed = Image.eval(scene(8), lambda v: 220 + v // 8)  # all of it in the top eighth
    return {
        "clean-1.jpg": (jpeg(scene(5)), None),
        "clean-2.jpg": (jpeg(scene(6)), None),
        "clean-3.jpg": (jpeg(clean), None),
        "dark.jpg": (jpeg(ImageEnhance.Brightness(scene(9)).enhance(0.1)), "dark"),
        "light.jpg": (jpeg(washed), "light"),
        "blurry.jpg": (jpeg(scene(10).filter(ImageFilter.GaussianBlur(3))), "blurry"),
        "empty.jpg": (jpeg(flat), "low_information"),
        "gray.jpg": (jpeg(scene(11).convert("L").convert("RGB")), "grayscale"),
        "panorama.jpg": (jpeg(scene(12, size=(720, 180))), "odd_aspect"),
        "tiny.jpg": (jpeg(scene(13, size=(64, 36))), "odd_size"),
    }
