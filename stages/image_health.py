"""What one image's pixels say about its health, measured by sync on a small gray copy: a
perceptual hash (and the hash of its mirror image) for near-duplicate search, and the
scores behind the quality flags (dark, light, blurry, low information, grayscale).

Every score is a plain number kept in the manifest; the thresholds that turn scores into
flags are params of the health stage, so a threshold can change without measuring again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Kept in the manifest's metadata: change it with any change to what a measurement gives,
# so that sync measures every file again rather than keep scores made the old way.
MEASUREMENT_VERSION = "health-1"
MEASURE_SIZE = 256  # px: the long side of the copy scores are measured on
HASH_SIZE = 8  # the hash keeps the 8 x 8 lowest frequencies: 64 bits
HASH_SCALE = 4  # ... of a DCT of a (8 x 4) x (8 x 4) = 32 x 32 gray copy, as imagehash's phash
# x-frequency v of a DCT-II changes sign by (-1)^v when the image is mirrored left to right
MIRROR_SIGNS = np.array([(-1.0) ** v for v in range(HASH_SIZE)])


@dataclass(frozen=True)
class HealthScores:
    """The pixel measurements of one image (see the module docstring)."""

    pixel_std: float  # spread of gray levels, 0-255: near 0 for a blank frame
    phash: str  # 64-bit perceptual hash, 16 hex digits
    phash_mirror: str  # the same of the image mirrored left to right
    dark: float  # the 99th percentile of gray, 0-1: low when even the brightest parts are dark
    light: float  # the 5th percentile of gray, 0-1: high when even the darkest parts are light
    sharpness: float  # the standard deviation of the gray Laplacian, 0-255 scale
    entropy: float  # bits per pixel of the gray histogram, 0-8
    colorfulness: float  # mean spread between a pixel's channels, 0-1: 0 for a gray image


def measure_request(width: int, height: int) -> tuple[int, int]:
    """The smallest size a JPEG may be decoded at (Image.draft) and still give a copy whose
    long side is MEASURE_SIZE."""
    scale = MEASURE_SIZE / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def bits_hex(bits: np.ndarray) -> str:
    """64 booleans as 16 hex digits, the first bit the highest."""
    value = 0
    for bit in bits.ravel():
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def perceptual_hashes(gray: Image.Image) -> tuple[str, str]:
    """The pHash of a gray image and of its mirror image: the signs, against their median,
    of the 8 x 8 lowest frequencies of the DCT of a 32 x 32 copy.

    The mirror's hash comes from the same coefficients with odd x-frequencies negated,
    which is what mirroring does to a DCT.
    """
    # Imported here, not at the top: sync's run that finds nothing new measures nothing,
    # and should not pay scipy's import.
    from scipy.fft import dctn

    side = HASH_SIZE * HASH_SCALE
    small = np.asarray(gray.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(small, type=2)[:HASH_SIZE, :HASH_SIZE]
    mirrored = low * MIRROR_SIGNS[None, :]
    return bits_hex(low > np.median(low)), bits_hex(mirrored > np.median(mirrored))


def laplacian_std(gray: np.ndarray) -> float:
    """The standard deviation of the 4-neighbour Laplacian of a gray array (edges: their
    strength falls as an image blurs)."""
    if min(gray.shape) < 3:
        return 0.0
    laplacian = (
        4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    )
    return float(laplacian.std())


def histogram_entropy(counts: np.ndarray) -> float:
    """Shannon entropy, in bits, of a histogram of counts."""
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * np.log2(shares)).sum())


def level_below(cumulative: np.ndarray, share: float) -> int:
    """The lowest gray level at or below which `share` of the pixels lie."""
    return int(np.searchsorted(cumulative, share * cumulative[-1]))


def channel_spread(rgb: np.ndarray) -> float:
    """The mean over pixels of (largest channel - smallest channel), 0-255."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(red, green), blue)
    low = np.minimum(np.minimum(red, green), blue)
    return float((high - low).mean())


def health_scores(copy: Image.Image) -> HealthScores:
    """Every score of an RGB measure copy (long side at most MEASURE_SIZE).

    Percentiles, spread and entropy come from one 256-level histogram of the gray copy.
    """
    gray_image = copy.convert("L")
    gray = np.asarray(gray_image)
    counts = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    total = counts.sum()
    mean = (counts * levels).sum() / total
    spread = np.sqrt((counts * (levels - mean) ** 2).sum() / total)
    cumulative = np.cumsum(counts)
    phash, phash_mirror = perceptual_hashes(gray_image)
    return HealthScores(
        pixel_std=round(float(spread), 4),
        phash=phash,
        phash_mirror=phash_mirror,
        dark=round(level_below(cumulative, 0.99) / 255.0, 4),
        light=round(level_below(cumulative, 0.05) / 255.0, 4),
        sharpness=round(laplacian_std(gray.astype(np.float32)), 4),
        entropy=round(histogram_entropy(counts), 4),
        colorfulness=round(channel_spread(np.asarray(copy)) / 255.0, 4),
    )
