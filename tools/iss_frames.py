"""Synthetic frames like those the ISS HDEV camera sends, for tests and benchmarks (each a
vertical blend of two colors of one scene kind, speckled, so that frames of one scene
look alike and scenes differ), and the README's ISS preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ISS_SCENES = (  # (top color, bottom color, speckle) of frames the ISS camera sends
    ((20, 60, 140), (10, 40, 110), 12),  # ocean
    ((235, 235, 240), (90, 130, 190), 40),  # clouds over sea
    ((150, 120, 80), (90, 110, 60), 30),  # desert and fields
    ((4, 4, 10), (12, 10, 20), 6),  # night
    ((255, 250, 220), (200, 160, 90), 20),  # sun glare
)


def iss_frame(scene: int, seed: int, width: int = 1280, height: int = 720) -> Image.Image:
    """A frame of one scene kind (an index of ISS_SCENES); `seed` makes it distinct."""
    top, bottom, speckle = (np.array(value, dtype=np.float32) for value in ISS_SCENES[scene])
    rng = np.random.default_rng(seed)
    blend = np.linspace(0, 1, 45, dtype=np.float32)[:, None, None]
    small = top * (1 - blend) + bottom * blend + rng.normal(0, speckle, (45, 80, 3))
    small = np.clip(small, 0, 255).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_iss_command() -> list[str]:
    """The `dvc exp run` arguments of the README's ISS preset (between its markers)."""
    block = README.read_text().split("<!-- iss-preset -->")[1]
    command = block.split("```bash")[1].split("```")[0].replace("\\\n", " ")
    words = command.split()
    assert words[:3] == ["dvc", "exp", "run"], command
    return words[3:]


def readme_iss_settings() -> dict[str, str]:
    """The preset's `-S key=value` settings, as text."""
    words = readme_iss_command()
    pairs = [words[index + 1] for index, word in enumerate(words) if word == "-S"]
    return dict(pair.split("=", 1) for pair in pairs)
