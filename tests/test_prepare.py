"""prepare: decoding once, fitting sizes, row alignment and the sha256 cache."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import (
    folder_bytes,
    good_image_files,
    image_bytes,
    jpeg_with_exif,
    pattern_image,
    write,
)
from PIL import Image

from stages import common, images, parts, prepare, sync_work, thumbnails

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(width: int, height: int, left: tuple, right: tuple) -> Image.Image:
    """An RGB image whose left half is one color and right half another."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = left
    array[:, width // 2 :] = right
    return Image.fromarray(array)


def bands(width: int, height: int, middle: tuple, sides: tuple) -> Image.Image:
    """An RGB image with a middle third of one color and outer thirds of another."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:] = sides
    array[:, width // 3 : 2 * width // 3] = middle
    return Image.fromarray(array)


def test_squash_stretches_to_the_target() -> None:
    result = images.fit_image(halves(200, 100, RED, BLUE), images.ImageSize(10, 10, "squash"))
    assert result.shape == (10, 10, 3) and result.dtype == np.uint8
    assert tuple(result[5, 0]) == RED and tuple(result[5, 9]) == BLUE


def test_crop_keeps_the_center_at_the_target_aspect() -> None:
    image = bands(300, 100, middle=RED, sides=BLUE)  # 3:1, red middle third
    result = images.fit_image(image, images.ImageSize(20, 20, "crop"))
    assert result.shape == (20, 20, 3)
    assert (result == RED).all(), "the center square of a 3:1 image is its red middle third"


def test_pad_fits_inside_and_centers_on_black() -> None:
    result = images.fit_image(halves(200, 100, RED, RED), images.ImageSize(20, 20, "pad"))
    assert result.shape == (20, 20, 3)
    assert (result[:5] == 0).all() and (result[15:] == 0).all(), "black above and below"
    assert (result[5:15] == RED).all()


def test_box_filter_averages_instead_of_picking_pixels() -> None:
    checker = np.indices((64, 64)).sum(axis=0) % 2 * 255
    image = Image.fromarray(checker.astype(np.uint8)).convert("RGB")
    result = images.fit_image(image, images.ImageSize(8, 8, "squash"))
    assert np.abs(result.astype(int) - 127).max() <= 1, "a fine checkerboard averages to gray"


def test_sixteen_bit_and_transparent_images_convert_sensibly() -> None:
    levels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = images.to_rgb(Image.fromarray(levels))
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]

    transparent = Image.new("RGBA", (2, 1), (255, 255, 255, 0))
    transparent.putpixel((1, 0), (255, 255, 255, 255))
    assert np.asarray(images.to_rgb(transparent))[0].tolist() == [[0, 0, 0], [255, 255, 255]]

    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red in CMYK
    assert tuple(np.asarray(images.to_rgb(cmyk))[0, 0]) == RED


def test_exif_rotated_images_are_decoded_upright() -> None:
    data = jpeg_with_exif(halves(80, 40, RED, BLUE), orientation=6)
    pixels = images.decode_for_targets(data, [images.ImageSize(8, 4, "squash")])[0]
    # Orientation 6 turns the picture a quarter clockwise: its left half ends on top.
    assert np.abs(pixels[0].astype(int) - RED).max() < 40
    assert np.abs(pixels[-1].astype(int) - BLUE).max() < 40


def test_jpeg_dct_scaling_stays_close_to_a_full_decode() -> None:
    frame = pattern_image(1280, 720, seed=3)
    data = image_bytes(frame, "JPEG", quality=90)
    target = images.ImageSize(27, 48, "squash")
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", images.draft_request(image.size, 1, [target]))
        assert image.size == (160, 90), "a 1280x720 JPEG decodes at 1/8 scale for 48x27"
    fast = images.decode_for_targets(data, [target])[0].astype(int)
    with Image.open(io.BytesIO(data)) as image:
        full = images.fit_image(image.convert("RGB"), target).astype(int)
    assert np.abs(fast - full).mean() < 2.0


def make_manifest(folder: Path, names: list[str]) -> pd.DataFrame:
    """A manifest for files already in `folder`, as sync writes it (id, path, sha256)."""
    rows = []
    for name in names:
        data = (folder / name).read_bytes()
        rows.append({"id": Path(name).stem, "path": name, "sha256": images.sha256_hex(data)})
    return pd.DataFrame(rows)


def run_prepare(
    manifest: pd.DataFrame, collection: Path, settings: prepare.DecodeSizes, out: Path
) -> prepare.PrepareSummary:
    """Run prepare into `out` on one process."""
    return prepare.prepare_arrays(
        manifest,
        collection,
        settings,
        out / "cache",
        out / "pixels",
        out / "thumbs",
        out / "ids.parquet",
        workers=1,
    )


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    """A collection folder with twelve small JPEG frames."""
    folder = tmp_path / "collection"
    for index in range(12):
        write(folder / f"frame-{index:02d}.jpg", image_bytes(pattern_image(96, 54, index), "JPEG"))
    return folder


@pytest.fixture
def settings(params: dict[str, Any]) -> prepare.DecodeSizes:
    """Prepare params at the ISS sizes."""
    params["image"] = {"height": 27, "width": 48, "fit": "squash"}
    params["prepare"] = {"thumb_height": 54, "thumb_width": 96}
    return prepare.DecodeSizes.from_params(params)


def test_arrays_are_row_aligned_with_the_manifest(
    collection: Path, settings: prepare.DecodeSizes, tmp_path: Path
) -> None:
    names = sorted(path.name for path in collection.iterdir())[::-1]  # not sorted order
    manifest = make_manifest(collection, names)
    summary = run_prepare(manifest, collection, settings, tmp_path / "out")

    pixels = parts.PartedArray(tmp_path / "out/pixels")[:]
    thumbs = thumbnails.Thumbnails(tmp_path / "out/thumbs")
    assert pixels.shape == (12, 27, 48, 3) and thumbs.shape == (12, 54, 96, 3)
    assert pd.read_parquet(tmp_path / "out/ids.parquet")["id"].tolist() == manifest["id"].tolist()
    assert thumbs.ids() == manifest["id"].tolist()
    for row, name in enumerate(names):
        expected = images.decode_for_targets((collection / name).read_bytes(), settings.targets)
        np.testing.assert_array_equal(pixels[row], expected[0])
        assert thumbs.jpeg(row) == thumbnails.encode(expected[1])
        # JPEG at quality 90, 4:4:4: close to the decoded thumbnail, a quarter of its size.
        difference = np.abs(thumbs[row].astype(int) - expected[1].astype(int))
        assert difference.mean() < 3 and len(thumbs.jpeg(row)) < expected[1].nbytes / 2
    assert summary.decoded == 12 and summary.from_cache == 0


def test_new_images_alone_are_decoded_and_results_do_not_change(
    collection: Path, settings: prepare.DecodeSizes, tmp_path: Path
) -> None:
    names = sorted(path.name for path in collection.iterdir())
    run_prepare(make_manifest(collection, names[:10]), collection, settings, tmp_path / "a")

    summary = run_prepare(make_manifest(collection, names), collection, settings, tmp_path / "a")
    assert summary.decoded == 2 and summary.from_cache == 10

    fresh = run_prepare(make_manifest(collection, names), collection, settings, tmp_path / "b")
    assert fresh.decoded == 12
    for name in ("pixels", "thumbs"):
        assert folder_bytes(tmp_path / "a" / name) == folder_bytes(tmp_path / "b" / name)


def test_the_cache_is_keyed_by_content_not_by_name(
    collection: Path, settings: prepare.DecodeSizes, tmp_path: Path
) -> None:
    names = sorted(path.name for path in collection.iterdir())
    run_prepare(make_manifest(collection, names), collection, settings, tmp_path / "out")
    (collection / names[0]).rename(collection / "renamed.jpg")
    renamed = make_manifest(collection, ["renamed.jpg", *names[1:]])
    summary = run_prepare(renamed, collection, settings, tmp_path / "out")
    assert summary.decoded == 0
    # The same pixels; the thumbnails' part, which holds ids, is written again.
    assert summary.parts_written == 1
    assert thumbnails.Thumbnails(tmp_path / "out/thumbs").ids()[0] == "renamed"


def test_byte_identical_files_are_decoded_once(
    collection: Path, settings: prepare.DecodeSizes, tmp_path: Path
) -> None:
    write(collection / "copy.jpg", (collection / "frame-00.jpg").read_bytes())
    manifest = make_manifest(collection, ["frame-00.jpg", "copy.jpg", "frame-01.jpg"])
    summary = run_prepare(manifest, collection, settings, tmp_path / "out")
    pixels = parts.PartedArray(tmp_path / "out/pixels")
    assert summary.decoded == 2
    np.testing.assert_array_equal(pixels[0], pixels[1])


def test_other_settings_use_another_cache_entry(
    collection: Path, params: dict[str, Any], tmp_path: Path
) -> None:
    names = sorted(path.name for path in collection.iterdir())
    manifest = make_manifest(collection, names)
    for fit in ("squash", "crop"):
        params["image"]["fit"] = fit
        summary = run_prepare(
            manifest, collection, prepare.DecodeSizes.from_params(params), tmp_path / "out"
        )
        assert summary.decoded == 12


def test_a_file_changed_after_sync_is_named(
    collection: Path, settings: prepare.DecodeSizes, tmp_path: Path
) -> None:
    manifest = make_manifest(collection, ["frame-00.jpg", "frame-01.jpg"])
    (collection / "frame-01.jpg").write_bytes(image_bytes(pattern_image(96, 54, 99), "JPEG"))
    with pytest.raises(common.UserError, match=re.escape("frame-01.jpg changed after sync")):
        run_prepare(manifest, collection, settings, tmp_path / "out")
    assert not (tmp_path / "out/pixels").exists(), "no partial output is left"


def test_prepare_runs_the_same_on_several_processes(
    settings: prepare.DecodeSizes, tmp_path: Path
) -> None:
    folder = tmp_path / "many"
    for index in range(70):
        write(folder / f"{index:03d}.jpg", image_bytes(pattern_image(64, 36, index), "JPEG"))
    manifest = make_manifest(folder, sorted(path.name for path in folder.iterdir()))
    run_prepare(manifest, folder, settings, tmp_path / "one")
    prepare.prepare_arrays(
        manifest,
        folder,
        settings,
        tmp_path / "two/cache",
        tmp_path / "two/pixels",
        tmp_path / "two/thumbs",
        tmp_path / "two/ids.parquet",
        workers=2,
    )
    for name in ("pixels", "thumbs"):
        assert folder_bytes(tmp_path / "one" / name) == folder_bytes(tmp_path / "two" / name)


def test_every_mode_sync_accepts_is_prepared(
    params: dict[str, Any], settings: prepare.DecodeSizes, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    for relative, data in good_image_files().items():
        write(source / relative, data)
    params["sync"]["source"] = str(source)
    manifest = sync_work.sync_collection(
        sync_work.SyncParams.from_params(params), tmp_path / "collection", None, workers=1
    ).manifest
    run_prepare(manifest, tmp_path / "collection", settings, tmp_path / "out")
    pixels = parts.PartedArray(tmp_path / "out/pixels")[:]
    assert pixels.shape == (len(good_image_files()), 27, 48, 3)
    assert (pixels.reshape(len(pixels), -1).std(axis=1) > 5).all(), "every image has content"


@pytest.mark.parametrize(
    ("section", "key", "value", "words"),
    [
        ("image", "fit", "stretch", "image.fit = 'stretch' is not allowed; allowed: squash, crop"),
        ("image", "height", 0, "image.height = 0 is not allowed; expected an integer >= 1"),
        ("image", "width", 27.5, "image.width = 27.5 is not allowed; expected an integer"),
        ("prepare", "thumb_width", 100000, "expected an integer <= 4096"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(
    params: dict[str, Any], section: str, key: str, value: Any, words: str
) -> None:
    params[section][key] = value
    with pytest.raises(common.UserError, match=re.escape(words)):
        prepare.DecodeSizes.from_params(params)


def test_a_cache_segment_without_one_of_its_arrays_is_forgotten(tmp_path: Path) -> None:
    from stages.content_cache import ContentCache

    old = ContentCache(tmp_path, ("cluster",))
    old.add(["a", "b"], {"cluster": np.array([1, 2])})
    new = ContentCache(tmp_path, ("cluster", "fitted"))
    assert new.missing(["a", "b"]) == ["a", "b"]  # written before the cache kept "fitted"
    new.add(["a"], {"cluster": np.array([3]), "fitted": np.array([True])})
    again = ContentCache(tmp_path, ("cluster", "fitted"))
    assert again.missing(["a", "b"]) == ["b"]
    assert next(again.row_blocks(["a"], "cluster")).tolist() == [3]


def test_thumbnails_are_read_by_row_across_row_groups(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(thumbnails, "ROW_GROUP_ROWS", 4)
    arrays = [np.asarray(pattern_image(16, 9, seed)) for seed in range(10)]
    ids = [f"image-{row}" for row in range(10)]
    blocks = [
        [thumbnails.encode(a) for a in arrays[:7]],
        [thumbnails.encode(a) for a in arrays[7:]],
    ]
    thumbnails.write_table(tmp_path / "thumbs.parquet", ids, blocks, 9, 16)
    stored = thumbnails.load(ids, tmp_path / "thumbs.parquet")
    assert stored.shape == (10, 9, 16, 3) and len(stored.groups) == 3  # 4 + 3, then 3
    rows = np.array([9, 0, 5, 5, 3])
    picked = stored[rows]
    for index, row in enumerate(rows):
        np.testing.assert_array_equal(picked[index], stored[int(row)])
        assert stored.jpeg(int(row)) == thumbnails.encode(arrays[row])
    picked, positions = thumbnails.pick(stored, {0: np.array([9, 1]), 1: np.array([1, 4])})
    assert len(picked) == 3  # rows 1, 4 and 9, each decoded once
    for rows_of, rows in ((0, [9, 1]), (1, [1, 4])):
        np.testing.assert_array_equal(picked[positions[rows_of]], stored[np.array(rows)])
    with pytest.raises(common.UserError, match="list different images"):
        thumbnails.load(ids[::-1], tmp_path / "thumbs.parquet")


def test_thumbnails_decode_to_the_pixels_pillow_gives() -> None:
    rng = np.random.default_rng(5)
    for height, width in ((54, 96), (9, 16), (37, 5)):
        data = thumbnails.encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(thumbnails.decode(data), expected)
    with pytest.raises(ValueError, match="not a readable JPEG"):
        thumbnails.decode(b"not a jpeg")


def test_only_parts_whose_images_changed_are_written_again(
    collection: Path, settings: prepare.DecodeSizes, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(parts, "PART_IMAGES", 4)
    names = sorted(path.name for path in collection.iterdir())
    first = run_prepare(make_manifest(collection, names[:9]), collection, settings, tmp_path / "a")
    assert (first.parts_written, first.parts) == (6, 6)  # 4 + 4 + 1 images, pixels and thumbs
    kept = {path.name: path.stat().st_ino for path in (tmp_path / "a/pixels").iterdir()}

    grown = run_prepare(make_manifest(collection, names), collection, settings, tmp_path / "a")
    assert (grown.parts_written, grown.parts) == (2, 6)  # the last part of each: 1 to 4 images
    inodes = {path.name: path.stat().st_ino for path in (tmp_path / "a/pixels").iterdir()}
    assert inodes["part-00000.npy"] == kept["part-00000.npy"]
    assert inodes["part-00002.npy"] != kept["part-00002.npy"]

    run_prepare(make_manifest(collection, names), collection, settings, tmp_path / "b")
    for name in ("pixels", "thumbs"):
        assert folder_bytes(tmp_path / "a" / name) == folder_bytes(tmp_path / "b" / name)

    # An image sorted before the others shifts every row: every part is written again,
    # and a shorter collection leaves no stale part behind.
    shifted = run_prepare(
        make_manifest(collection, names[1:][::-1]), collection, settings, tmp_path / "a"
    )
    assert shifted.parts_written == 6
    assert sorted(path.name for path in (tmp_path / "a/thumbs").iterdir()) == [
        "_parts.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    stored = thumbnails.Thumbnails(tmp_path / "a/thumbs")
    assert stored.ids() == [Path(name).stem for name in names[1:][::-1]]


def test_a_run_stopped_half_way_leaves_no_key_for_a_part_it_rewrote(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(parts, "PART_IMAGES", 2)
    folder = tmp_path / "parts"

    def write(values: list[int]):
        def write_part(path: Path, rows: slice) -> None:
            if values[rows] == [-1]:
                raise OSError("disk full")
            np.save(path, np.array(values[rows]))

        return write_part

    shas = ["a", "b", "c"]
    assert parts.write_parts(folder, ".npy", "k", shas, write([1, 2, 3])) == 2
    with pytest.raises(OSError, match="disk full"):
        parts.write_parts(folder, ".npy", "other", shas, write([4, 5, -1]))
    # The first part holds 4, 5 now; its old key must not let a run with "k" keep it.
    assert parts.write_parts(folder, ".npy", "k", shas, write([1, 2, 3])) == 2
    assert parts.PartedArray(folder)[:].tolist() == [1, 2, 3]


def test_a_parted_array_reads_rows_as_one_array(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(parts, "PART_IMAGES", 3)
    whole = np.arange(8 * 2 * 3, dtype=np.uint8).reshape(8, 2, 3)
    shas = [str(row) for row in range(8)]
    parts.write_parts(tmp_path, ".npy", "k", shas, lambda path, rows: np.save(path, whole[rows]))
    array = parts.PartedArray(tmp_path)
    assert len(array) == 8 and array.shape == whole.shape and array.dtype == whole.dtype
    for rows in (np.array([7, 0, 3, 3, 5]), slice(2, 7), slice(None, None, -2), [1]):
        np.testing.assert_array_equal(array[rows], whole[rows])
    np.testing.assert_array_equal(array[-1], whole[7])
    np.testing.assert_array_equal(array[np.int64(4)], whole[4])
    with pytest.raises(IndexError):
        array[np.array([8])]
    with pytest.raises(common.UserError, match="run `dvc repro prepare`"):
        parts.PartedArray(tmp_path / "absent")
