"""embed: every image encoded, in order, streamed in row groups; the errors."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import folder_bytes, pattern_image

from stages import common, embed, encoder_runtime, train


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


def embed_into(
    encoder_file: Path,
    pixels: np.ndarray,
    folder: Path,
    sha256s: list[str] | None = None,
    runtime: encoder_runtime.Runtime = "litert",
) -> tuple[Path, int]:
    """Embed `pixels` with the caches in `folder`; the table's path and how many were encoded."""
    encoder = encoder_runtime.open_encoder(
        encoder_file, pixels.shape[1:], runtime, folder / "litert"
    )
    ids = [f"image-{index:03d}" for index in range(len(pixels))]
    sha256s = sha256s or [f"sha-{index:03d}" for index in range(len(pixels))]
    path = folder / "embeddings"
    encoded = embed.embed_images(encoder, pixels, ids, sha256s, folder / "cache", path, 16)
    return path, encoded


@pytest.mark.parametrize("runtime", ["litert", "keras"])
def test_every_image_is_embedded_in_order(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path, runtime: encoder_runtime.Runtime
) -> None:
    path, encoded = embed_into(encoder_file, pixels, tmp_path, runtime=runtime)
    read_ids, matrix = common.read_embeddings(path)
    assert encoded == 70
    assert read_ids == [f"image-{index:03d}" for index in range(70)]
    assert matrix.shape == (70, 4 * 6 * 4)
    assert matrix.dtype == np.float32
    encoder = embed.load_encoder(encoder_file, pixels.shape[1:])
    whole = np.asarray(encoder.predict_on_batch(pixels.astype(np.float32) / 255))
    np.testing.assert_allclose(matrix, whole.reshape(70, -1), rtol=1e-5, atol=1e-6)
    assert common.parquet_keys(path, "embed") == {"embed_key": "cache"}


def test_embeddings_are_written_in_row_groups(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embed, "ROW_GROUP_ROWS", 32)
    path, _ = embed_into(encoder_file, pixels, tmp_path)
    metadata = pq.ParquetFile(path / "part-00000.parquet").metadata
    assert metadata.num_row_groups == 3 and metadata.num_rows == 70


def test_two_runs_give_identical_files(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    first, _ = embed_into(encoder_file, pixels, tmp_path / "a")
    second, _ = embed_into(encoder_file, pixels, tmp_path / "b")
    assert folder_bytes(first) == folder_bytes(second)


def test_only_new_images_are_encoded_and_the_result_is_as_from_scratch(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    embed_into(encoder_file, pixels[:60], tmp_path / "grown")
    grown, encoded = embed_into(encoder_file, pixels, tmp_path / "grown")
    assert encoded == 10, "the 60 seen before come from the cache"
    assert embed_into(encoder_file, pixels, tmp_path / "grown")[1] == 0
    scratch, _ = embed_into(encoder_file, pixels, tmp_path / "scratch")
    assert folder_bytes(grown) == folder_bytes(scratch)


def test_a_file_twice_is_encoded_once(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    twice = np.concatenate([pixels[:5], pixels[:1]])
    sha256s = [f"sha-{index}" for index in range(5)] + ["sha-0"]
    path, encoded = embed_into(encoder_file, twice, tmp_path, sha256s)
    _, matrix = common.read_embeddings(path)
    assert encoded == 5
    np.testing.assert_array_equal(matrix[5], matrix[0])


RUNTIMES = ["litert", "keras"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_model_for_another_image_size_is_a_clear_error(
    encoder_file: Path, tmp_path: Path, runtime: encoder_runtime.Runtime
) -> None:
    with pytest.raises(
        common.UserError, match=re.escape("expects 16x24 images but the pixels are 27x48")
    ):
        encoder_runtime.open_encoder(encoder_file, (27, 48, 3), runtime, tmp_path)
    with pytest.raises(common.UserError, match=re.escape("expects 16x24 images")):
        embed.load_encoder(encoder_file, (27, 48, 3))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_missing_encoder_is_named(tmp_path: Path, runtime: encoder_runtime.Runtime) -> None:
    missing = tmp_path / "encoder.keras"
    with pytest.raises(common.UserError, match="missing: run `dvc repro train` first"):
        encoder_runtime.open_encoder(missing, (16, 24, 3), runtime, tmp_path / "litert")
    with pytest.raises(common.UserError, match="missing: run `dvc repro train` first"):
        embed.load_encoder(missing, (16, 24, 3))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_file_that_is_no_model_is_named(tmp_path: Path, runtime: encoder_runtime.Runtime) -> None:
    (tmp_path / "encoder.keras").write_bytes(b"not a zip")
    with pytest.raises(common.UserError, match=r"cannot load the encoder .*encoder\.keras"):
        encoder_runtime.open_encoder(
            tmp_path / "encoder.keras", (16, 24, 3), runtime, tmp_path / "litert"
        )
    assert not (tmp_path / "litert").exists() or not any((tmp_path / "litert").iterdir())
    with pytest.raises(common.UserError, match="cannot load the encoder"):
        embed.load_encoder(tmp_path / "encoder.keras", (16, 24, 3))


def test_litert_and_keras_agree_and_each_image_is_encoded_alike_in_any_batch(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKERS", "2")
    lite = encoder_runtime.open_encoder(encoder_file, (16, 24, 3), "litert", tmp_path)
    keras_encoder = encoder_runtime.open_encoder(encoder_file, (16, 24, 3), "keras", tmp_path)
    together = lite.encode(pixels[:16], 16)
    np.testing.assert_allclose(
        together, keras_encoder.encode(pixels[:16], 16), rtol=1e-5, atol=1e-6
    )
    assert together.shape == (16, lite.values) and together.dtype == np.float32
    # Alone, in a smaller batch, or among others: the same bytes.
    np.testing.assert_array_equal(lite.encode(pixels[3:4], 1)[0], together[3])
    np.testing.assert_array_equal(lite.encode(pixels[[40, 3, 50]], 8)[1], together[3])

    # On one thread or several (WORKERS, a Dask worker's cores): the same bytes.
    monkeypatch.setenv("WORKERS", "1")
    alone = encoder_runtime.open_encoder(encoder_file, (16, 24, 3), "litert", tmp_path)
    np.testing.assert_array_equal(alone.encode(pixels[:16], 16), together)


def test_a_damaged_litert_file_in_the_cache_is_converted_again(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    converted = encoder_runtime.litert_file(encoder_file, tmp_path)
    expected = encoder_runtime.open_encoder(encoder_file, (16, 24, 3), "litert", tmp_path)
    codes = expected.encode(pixels[:4], 4)
    converted.write_bytes(converted.read_bytes()[:1000])  # cut short
    again = encoder_runtime.open_encoder(encoder_file, (16, 24, 3), "litert", tmp_path)
    np.testing.assert_array_equal(again.encode(pixels[:4], 4), codes)
    assert converted.stat().st_size > 1000


@pytest.mark.parametrize("model", ["simple", "vae", "conv_vae"])
def test_every_kind_of_autoencoder_runs_on_litert(
    project_params: dict, pixels: np.ndarray, tmp_path: Path, model: str
) -> None:
    params = copy.deepcopy(project_params)
    params["train"].update({"filters": [8, 4], "model": model, "latent_dim": 6})
    models = train.build_models(16, 24, train.TrainParams.from_params(params))
    train.save_model(models.encoder, tmp_path / "encoder.keras")
    lite = encoder_runtime.open_encoder(tmp_path / "encoder.keras", (16, 24, 3), "litert", tmp_path)
    expected = embed.predict_padded(models.encoder, pixels[:8], 8).reshape(8, -1)
    np.testing.assert_allclose(lite.encode(pixels[:8], 8), expected, rtol=1e-5, atol=1e-6)


def test_the_litert_file_is_converted_once_and_encoding_needs_no_tensorflow(
    encoder_file: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    converted = encoder_runtime.litert_file(encoder_file, tmp_path)
    stamp = converted.stat().st_mtime_ns
    assert encoder_runtime.litert_file(encoder_file, tmp_path) == converted
    assert converted.stat().st_mtime_ns == stamp, "the second call reuses the file"
    assert list(tmp_path.iterdir()) == [converted], "no staging file is left"
    np.save(tmp_path / "pixels.npy", pixels[:4])
    code = (
        "import sys\nimport numpy as np\nfrom pathlib import Path\n"
        "from stages import encoder_runtime\n"
        f"folder = Path({str(tmp_path)!r})\n"
        f"encoder = encoder_runtime.open_encoder(Path({str(encoder_file)!r}), (16, 24, 3), "
        "'litert', folder)\n"
        "np.save(folder / 'codes.npy', encoder.encode(np.load(folder / 'pixels.npy'), 4))\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]
    assert "XNNPACK" not in result.stderr
    lite = encoder_runtime.open_encoder(encoder_file, (16, 24, 3), "litert", tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), lite.encode(pixels[:4], 4))


def test_a_bad_batch_size_is_refused(params: dict[str, Any]) -> None:
    params["embed"]["batch_size"] = 0
    with pytest.raises(common.UserError, match=re.escape("embed.batch_size = 0 is not allowed")):
        embed.EmbedParams.from_params(params)


def test_bad_latent_vectors_stop_with_their_ids() -> None:
    vectors = np.ones((4, 3), dtype=np.float32)
    vectors[:, 0] = [0, 2, 3, 4]
    embed.check_vectors(["a", "b", "c", "d"], vectors)
    vectors[2, 1] = np.nan
    with pytest.raises(common.UserError, match=r"1 latent vectors that are not finite \(first: c"):
        embed.check_vectors(["a", "b", "c", "d"], vectors)
    vectors[2] = 0.5
    with pytest.raises(common.UserError, match=r"constant \(first: c\)"):
        embed.check_vectors(["a", "b", "c", "d"], vectors)
