"""Shared fixtures: small images of every kind a user's folder may hold, and params."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(REPO_ROOT))
# The stages package sets TensorFlow's options (oneDNN on) before TensorFlow loads; tests
# import Keras themselves, so it comes first here, or tests would run other kernels than
# the pipeline does.
import stages  # noqa: E402, F401
from tools.project_copy import clean_copy  # noqa: E402, F401 (for the tests that run dvc)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder (a stage's parts), by name."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def pattern_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with smooth gradients and a few blocks: real content, not blank."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255 // max(1, width - 1)).astype(np.uint8)
    green = (y * 255 // max(1, height - 1)).astype(np.uint8)
    blue = np.full((height, width), rng.integers(0, 256), dtype=np.uint8)
    array = np.stack([red, green, blue], axis=-1)
    for _ in range(3):
        top, left = rng.integers(0, height // 2 + 1), rng.integers(0, width // 2 + 1)
        array[top : top + height // 4, left : left + width // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(array, mode="RGB")


def image_bytes(image: Image.Image, format: str, **options: Any) -> bytes:
    """Encode an image to bytes in a file format."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    """Write bytes to a path, making its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def jpeg_with_exif(image: Image.Image, orientation: int = 1, taken_at: str | None = None) -> bytes:
    """A JPEG carrying an EXIF orientation and, optionally, a DateTimeOriginal."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    if taken_at is not None:
        exif.get_ifd(0x8769)[36867] = taken_at
    return image_bytes(image, "JPEG", quality=95, exif=exif.tobytes())


def good_image_files() -> dict[str, bytes]:
    """Relative path -> bytes of images in every mode sync must accept."""
    rgb = pattern_image(64, 40, seed=1)
    sixteen_bit = (np.linspace(0, 65535, 48 * 32).reshape(32, 48)).astype(np.uint16)
    return {
        "20170512-103200.jpg": image_bytes(rgb, "JPEG", quality=90),
        "gray.png": image_bytes(rgb.convert("L"), "PNG"),
        "palette.png": image_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "transparent.png": image_bytes(rgb.convert("RGBA"), "PNG"),
        "cmyk.jpg": image_bytes(rgb.convert("CMYK"), "JPEG", quality=95),
        "sixteen-bit.png": image_bytes(Image.fromarray(sixteen_bit), "PNG"),
        "rotated.jpg": jpeg_with_exif(pattern_image(60, 30, seed=2), orientation=6),
        "nested/folder/exif-time.jpg": jpeg_with_exif(
            pattern_image(50, 50, seed=3), taken_at="2019:03:04 05:06:07"
        ),
    }


def bad_image_files() -> dict[str, tuple[bytes, str]]:
    """Relative path -> (bytes, expected words of the rejection reason)."""
    jpeg = image_bytes(pattern_image(320, 180, seed=4), "JPEG", quality=90)
    png = image_bytes(pattern_image(120, 80, seed=5), "PNG")
    corrupt_png = bytearray(png)
    middle = len(png) // 2
    corrupt_png[middle : middle + 200] = bytes(200)  # zeroes over the compressed pixels
    return {
        "notes.txt": (b"not an image, just some words\n", "not an image"),
        "fake.jpg": (b"\xff\xd8\xff\xe0 this is not really a JPEG", "cannot decode"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "cannot decode"),
        "corrupt.png": (bytes(corrupt_png), "cannot decode"),
        "empty.png": (b"", "empty file"),
    }


@pytest.fixture
def source_folder(tmp_path: Path) -> Path:
    """A folder of good images of every kind, plus bad files, plus a hidden file."""
    folder = tmp_path / "source"
    for relative, data in good_image_files().items():
        write(folder / relative, data)
    for relative, (data, _) in bad_image_files().items():
        write(folder / relative, data)
    write(folder / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    return folder


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture, monkeypatch) -> pytest.LogCaptureFixture:
    """caplog, with the records of the stages' loggers (which print on their own and do not
    pass records up) passed to it."""
    from stages import common

    for stage in yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]:
        monkeypatch.setattr(common.get_logger(stage), "propagate", True)
    return caplog


@pytest.fixture(scope="session")
def project_params() -> dict[str, Any]:
    """The committed params.yaml."""
    with open(REPO_ROOT / "params.yaml", encoding="utf-8") as file:
        return yaml.safe_load(file)


@pytest.fixture
def params(project_params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the committed params that a test may change."""
    return copy.deepcopy(project_params)


def tree_snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a folder with its bytes and modification time."""
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ----------------------------------------------------------------------------- projects


def project_environment() -> dict[str, str]:
    """The environment of a user who activated the project's virtual environment."""
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment["TF_CPP_MIN_LOG_LEVEL"] = "3"
    environment.pop("WORKERS", None)
    return environment


def run(
    command: list[str], cwd: Path, extra_environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in the project copy and return what it printed."""
    environment = {**project_environment(), **(extra_environment or {})}
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900
    )


def dvc(arguments: list[str], cwd: Path, extra_environment: dict[str, str] | None = None) -> str:
    """Run a dvc command through this interpreter; fail the test with its output if it fails."""
    result = run([sys.executable, "-m", "dvc", *arguments], cwd, extra_environment)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def stages_run(printed: str) -> list[str]:
    """The stages a `dvc repro` ran, in order, from what it printed."""
    return re.findall(r"Running stage '([\w-]+)'", printed)


def is_up_to_date(project: Path, *targets: str) -> bool:
    """Whether `dvc status` finds nothing to run but sync, which runs every time by design
    (it looks at the source, which DVC cannot see)."""
    result = run([sys.executable, "-m", "dvc", "status", "--json", *targets], project)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    return status.pop("sync", ["always changed"]) == ["always changed"] and not status


def run_with_stages(
    arguments: list[str], folder: Path, timeout: int
) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with `arguments` in `folder` (outside the project), where the
    stages package still imports."""
    environment = project_environment()
    environment["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def in_fresh_process(inputs: dict[str, Any], code: str, folder: Path) -> None:
    """Pickle `inputs` into `folder` and run `code` in a new interpreter there, where they
    are the dict `inputs` and the stages package imports; fail the test if it fails.

    What one process leaks into its results (memory addresses, per-process ids, global
    counters) shows only when a result made in another process is compared with it.
    """
    (folder / "inputs.pickle").write_bytes(pickle.dumps(inputs))
    script = "import pickle\ninputs = pickle.loads(open('inputs.pickle', 'rb').read())\n" + code
    result = run_with_stages(["-c", script], folder, timeout=600)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, f"returncode == {result.returncode}: {printed}"
