"""embed: every image encoded, in order, streamed in row groups; the errors."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import pattern_image

from stages import common, embed, train


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Seventy 16x24 images."""
    return np.stack([np.asarray(pattern_image(24, 16, seed)) for seed in range(70)])


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory, project_params: dict) -> Path:
    """An untrained simple_conv encoder for 16x24 images, saved as train saves it."""
    params = copy.deepcopy(project_params)
    params["train"]["filters"] = [8, 4]
    models = train.build_models(16, 24, train.TrainParams.from_params(params))
    path = tmp_path_factory.mktemp("model") / "encoder.keras"
    train.save_model(models.encoder, path)
    return path


def test_every_image_is_embedded_in_order(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    encoder = embed.load_encoder(encoder_file, pixels.shape[1:])
    ids = [f"image-{index:03d}" for index in range(len(pixels))]
    dimension = embed.write_embeddings(encoder, pixels, ids, tmp_path / "e.parquet", 16)

    read_ids, matrix = common.read_embeddings(tmp_path / "e.parquet")
    assert read_ids == ids
    assert matrix.shape == (70, dimension) == (70, 4 * 6 * 4)
    assert matrix.dtype == np.float32
    whole = np.asarray(encoder.predict_on_batch(pixels.astype(np.float32) / 255))
    np.testing.assert_allclose(matrix, whole.reshape(70, -1), rtol=1e-5, atol=1e-6)


def test_embeddings_are_written_in_row_groups(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embed, "ROW_GROUP_ROWS", 32)
    encoder = embed.load_encoder(encoder_file, pixels.shape[1:])
    ids = [str(index) for index in range(len(pixels))]
    embed.write_embeddings(encoder, pixels, ids, tmp_path / "e.parquet", 16)
    metadata = pq.ParquetFile(tmp_path / "e.parquet").metadata
    assert metadata.num_row_groups == 3 and metadata.num_rows == 70


def test_two_runs_give_identical_files(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    ids = [str(index) for index in range(len(pixels))]
    for name in ("a", "b"):
        encoder = embed.load_encoder(encoder_file, pixels.shape[1:])
        embed.write_embeddings(encoder, pixels, ids, tmp_path / f"{name}.parquet", 16)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_a_model_for_another_image_size_is_a_clear_error(encoder_file: Path) -> None:
    with pytest.raises(
        common.UserError, match=re.escape("expects 16x24 images but the pixels are 27x48")
    ):
        embed.load_encoder(encoder_file, (27, 48, 3))


def test_a_missing_encoder_is_named(tmp_path: Path) -> None:
    with pytest.raises(common.UserError, match="missing: run `dvc repro train` first"):
        embed.load_encoder(tmp_path / "encoder.keras", (16, 24, 3))


def test_a_file_that_is_no_model_is_named(tmp_path: Path) -> None:
    (tmp_path / "encoder.keras").write_bytes(b"not a zip")
    with pytest.raises(common.UserError, match="cannot load the encoder"):
        embed.load_encoder(tmp_path / "encoder.keras", (16, 24, 3))


def test_a_bad_batch_size_is_refused(params: dict[str, Any]) -> None:
    params["embed"]["batch_size"] = 0
    with pytest.raises(common.UserError, match=re.escape("embed.batch_size = 0 is not allowed")):
        embed.EmbedParams.from_params(params)
