"""sync: accepting, rejecting, copying incrementally and describing images."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import (
    REPO_ROOT,
    bad_image_files,
    good_image_files,
    image_bytes,
    pattern_image,
    tree_snapshot,
    write,
)
from PIL import Image

from stages import (
    common,
    image_health,
    remote,
    settings,
    sync_files,
    sync_last_run,
    sync_manifest,
    sync_sources,
    sync_work,
)


def sync_params(params: dict[str, Any], source: Path | str, **changes: Any) -> sync_work.SyncParams:
    """SyncParams from the committed params with a source and some changes."""
    params = copy.deepcopy(params)
    params["sync"]["source"] = str(source)
    params["sync"].update(changes)
    return sync_work.SyncParams.from_params(params)


def run_sync(
    settings: sync_work.SyncParams, collection: Path, previous: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, sync_work.SyncSummary]:
    """Run sync on one process (as the stage does with WORKERS=1)."""
    result = sync_work.sync_collection(settings, collection, previous, workers=1)
    manifest, rejected, summary = result.manifest, result.rejected, result.summary
    return manifest, rejected, summary


def test_bad_files_are_rejected_with_reasons_and_good_files_kept(
    params: dict[str, Any], source_folder: Path, tmp_path: Path
) -> None:
    collection = tmp_path / "collection"
    manifest, rejected, summary = run_sync(sync_params(params, source_folder), collection)

    reasons = dict(zip(rejected["path"], rejected["reason"]))
    for relative, (_, expected_words) in bad_image_files().items():
        assert expected_words in reasons[relative], (relative, reasons[relative])
        assert not (collection / relative).exists()
    assert set(reasons) == set(bad_image_files())
    assert sorted(manifest["path"]) == sorted(good_image_files())
    for relative, data in good_image_files().items():
        assert (collection / relative).read_bytes() == data
    assert summary.rejected == len(bad_image_files())
    assert summary.hidden_skipped == 1
    assert not list(collection.rglob(".*")), "no temporary or hidden file is left behind"


def test_an_image_over_the_pixel_limit_is_rejected_before_decoding(
    params: dict[str, Any], tmp_path: Path
) -> None:
    source = tmp_path / "source"
    # 15000 x 15000 one-bit pixels compress to a few kilobytes: a decompression bomb.
    write(source / "bomb.png", image_bytes(Image.new("1", (15000, 15000)), "PNG"))
    write(source / "fine.png", image_bytes(pattern_image(40, 30), "PNG"))
    manifest, rejected, _ = run_sync(sync_params(params, source), tmp_path / "collection")

    assert manifest["path"].tolist() == ["fine.png"]
    assert rejected["path"].tolist() == ["bomb.png"]
    assert "225000000 pixels is over sync.max_pixels = 100000000" in rejected["reason"][0]


def test_every_mode_is_accepted_and_sizes_are_upright(
    params: dict[str, Any], source_folder: Path, tmp_path: Path
) -> None:
    manifest, _, _ = run_sync(sync_params(params, source_folder), tmp_path / "collection")
    sizes = manifest.set_index("path")[["width", "height"]]

    assert tuple(sizes.loc["rotated.jpg"]) == (30, 60), "EXIF orientation 6 swaps the sides"
    assert tuple(sizes.loc["sixteen-bit.png"]) == (48, 32)
    assert tuple(sizes.loc["cmyk.jpg"]) == (64, 40)
    assert (manifest["sha256"].str.len() == 64).all()
    assert (manifest["bytes"] > 0).all()


def test_the_source_is_left_byte_identical(
    params: dict[str, Any], source_folder: Path, tmp_path: Path
) -> None:
    before = tree_snapshot(source_folder)
    settings = sync_params(params, source_folder, mirror=True)
    run_sync(settings, tmp_path / "collection")
    run_sync(settings, tmp_path / "collection")
    assert tree_snapshot(source_folder) == before


def test_a_second_sync_copies_only_new_and_changed_files(
    params: dict[str, Any], source_folder: Path, tmp_path: Path
) -> None:
    collection = tmp_path / "collection"
    settings = sync_params(params, source_folder)
    manifest, _, first = run_sync(settings, collection)
    assert first.copied == len(good_image_files())

    write(source_folder / "new/one.jpg", image_bytes(pattern_image(30, 20, seed=7), "JPEG"))
    write(source_folder / "new/two.png", image_bytes(pattern_image(20, 30, seed=8), "PNG"))
    manifest, _, second = run_sync(settings, collection, previous=manifest)
    assert second.copied == 2
    assert {"new/one.jpg", "new/two.png"} <= set(manifest["path"])

    changed = source_folder / "gray.png"
    changed.write_bytes(image_bytes(pattern_image(64, 40, seed=9).convert("L"), "PNG"))
    os.utime(changed, ns=(10**18, 10**18))
    manifest, _, third = run_sync(settings, collection, previous=manifest)
    assert third.copied == 1
    assert (collection / "gray.png").read_bytes() == changed.read_bytes()

    _, _, fourth = run_sync(settings, collection, previous=manifest)
    assert fourth.copied == 0


def test_reused_measurements_match_fresh_ones(
    params: dict[str, Any], source_folder: Path, tmp_path: Path
) -> None:
    collection = tmp_path / "collection"
    settings = sync_params(params, source_folder)
    fresh, _, _ = run_sync(settings, collection)
    reused, _, _ = run_sync(settings, collection, previous=fresh)
    pd.testing.assert_frame_equal(fresh, reused)


def test_files_the_source_lost_are_kept_unless_mirror_is_set(
    params: dict[str, Any], source_folder: Path, tmp_path: Path
) -> None:
    collection = tmp_path / "collection"
    manifest, _, _ = run_sync(sync_params(params, source_folder), collection)
    (source_folder / "gray.png").unlink()

    kept_manifest, _, kept = run_sync(sync_params(params, source_folder), collection, manifest)
    assert kept.kept == 1 and kept.removed == 0
    assert (collection / "gray.png").exists()
    assert "gray.png" in set(kept_manifest["path"])

    mirrored, _, mirror = run_sync(
        sync_params(params, source_folder, mirror=True), collection, kept_manifest
    )
    assert mirror.removed == 1
    assert not (collection / "gray.png").exists()
    assert "gray.png" not in set(mirrored["path"])


def test_taken_at_comes_from_the_name_then_exif_else_null(
    params: dict[str, Any], source_folder: Path, tmp_path: Path
) -> None:
    manifest, _, _ = run_sync(sync_params(params, source_folder), tmp_path / "collection")
    taken_at = manifest.set_index("path")["taken_at"]

    assert taken_at["20170512-103200.jpg"] == pd.Timestamp("2017-05-12 10:32:00")
    assert taken_at["nested/folder/exif-time.jpg"] == pd.Timestamp("2019-03-04 05:06:07")
    assert pd.isna(taken_at["gray.png"])


def test_labels_come_from_top_level_folders_when_asked(
    params: dict[str, Any], tmp_path: Path
) -> None:
    source = tmp_path / "source"
    write(source / "cats/a.png", image_bytes(pattern_image(20, 20, 1), "PNG"))
    write(source / "dogs/deeper/b.png", image_bytes(pattern_image(20, 20, 2), "PNG"))
    write(source / "c.png", image_bytes(pattern_image(20, 20, 3), "PNG"))

    manifest, _, _ = run_sync(sync_params(params, source, label_from="folder"), tmp_path / "c1")
    labels = manifest.set_index("path")["label"]
    assert labels["cats/a.png"] == "cats"
    assert labels["dogs/deeper/b.png"] == "dogs"
    assert pd.isna(labels["c.png"])

    manifest, _, _ = run_sync(sync_params(params, source), tmp_path / "c2")
    assert manifest["label"].isna().all()


def test_history_lines_are_joined_on_id_and_bad_lines_counted(
    params: dict[str, Any], tmp_path: Path
) -> None:
    source = tmp_path / "source"
    for index, stem in enumerate(["20170512-103200", "20170512-103300", "20170512-103400"]):
        write(source / f"{stem}.jpg", image_bytes(pattern_image(32, 18, index), "JPEG"))
    history = tmp_path / "history.txt"
    history.write_text(
        "lat;lon;id;place\n"
        "51.5;-0.12;20170512-103200;London; UK\n"  # a place may hold ';'
        ";;20170512-103300;\n"  # every field but the id empty
        "not-a-number;3;20170512-103400;Nowhere\n"  # malformed: latitude
        "95;3;20170512-103400;Too far north\n"  # malformed: out of range
        "just one field\n"  # malformed: too few fields
        "\n"
        "10;20;unknown-frame;Sea\n",  # matches no image
        encoding="utf-8",
    )
    settings = sync_params(params, source, history=str(history))
    result = sync_work.sync_collection(settings, tmp_path / "collection", None, 1)
    manifest, report = result.manifest, result.history
    rows = manifest.set_index("id")

    assert report is not None and report.malformed_lines == [4, 5, 6]
    assert rows.loc["20170512-103200", "latitude"] == 51.5
    assert rows.loc["20170512-103200", "longitude"] == -0.12
    assert rows.loc["20170512-103200", "place"] == "London; UK"
    assert pd.isna(rows.loc["20170512-103300", "latitude"])
    assert pd.isna(rows.loc["20170512-103300", "place"])
    assert pd.isna(rows.loc["20170512-103400", "latitude"])
    assert len(manifest) == 3


def test_a_missing_history_file_is_named(params: dict[str, Any], source_folder: Path) -> None:
    settings = sync_params(params, source_folder, history="/nowhere/history.txt")
    with pytest.raises(
        common.UserError, match=re.escape("sync.history: file /nowhere/history.txt")
    ):
        sync_work.sync_collection(settings, source_folder.parent / "collection", None, 1)


def test_blank_frames_and_byte_identical_files_are_flagged_not_dropped(
    params: dict[str, Any], tmp_path: Path
) -> None:
    source = tmp_path / "source"
    frame = image_bytes(pattern_image(64, 36, seed=11), "JPEG")
    write(source / "a-original.jpg", frame)
    write(source / "b-copy.jpg", frame)
    noise = np.random.default_rng(0).integers(0, 2, (36, 64, 3), dtype=np.uint8) + 100
    write(source / "feed-off.png", image_bytes(Image.fromarray(noise), "PNG"))

    manifest, _, _ = run_sync(sync_params(params, source), tmp_path / "collection")
    rows = manifest.set_index("id")
    assert len(manifest) == 3
    assert bool(rows.loc["feed-off", "blank"]) and not rows.loc["a-original", "blank"]
    assert bool(rows.loc["b-copy", "duplicate"])
    assert rows.loc["b-copy", "duplicate_of"] == "a-original"
    assert not rows.loc["a-original", "duplicate"]


def test_ids_are_stems_unless_two_files_share_one() -> None:
    paths = ["a/frame.jpg", "b/frame.jpg", "solo.png"]
    assert sync_manifest.assign_ids(paths) == ["a/frame.jpg", "b/frame.jpg", "solo"]
    # "x.png.jpg" has the unique stem "x.png", which is also the path id of "x.png"
    # (whose stem "x" it shares with "b/x.png"): both fall back to their paths.
    paths = ["b/x.png", "x.png", "x.png.jpg"]
    assert sync_manifest.assign_ids(paths) == ["b/x.png", "x.png", "x.png.jpg"]


def test_the_builtin_demo_is_the_scikit_learn_digits() -> None:
    files = sync_sources.digits_source_files()
    assert len(files) == 1797
    assert {item.label for item in files} == {str(digit) for digit in range(10)}
    first = files[0]
    assert first.relative_path == "0/digit-0000.png" and first.label == "0"
    with Image.open(__import__("io").BytesIO(first.content)) as image:
        assert image.size == (32, 32) and image.mode == "L"


def test_a_missing_source_folder_is_named(params: dict[str, Any], tmp_path: Path) -> None:
    settings = sync_params(params, tmp_path / "not-here")
    with pytest.raises(
        common.UserError, match=re.escape(f"folder {tmp_path / 'not-here'} does not exist")
    ):
        run_sync(settings, tmp_path / "collection")


def test_a_source_inside_the_collection_is_refused(params: dict[str, Any], tmp_path: Path) -> None:
    collection = tmp_path / "collection"
    (collection / "inner").mkdir(parents=True)
    with pytest.raises(common.UserError, match="inside the collection"):
        run_sync(sync_params(params, collection / "inner"), collection)


def test_a_source_with_no_image_is_an_error_that_names_it(
    params: dict[str, Any], tmp_path: Path
) -> None:
    write(tmp_path / "source/readme.txt", b"hello")
    with pytest.raises(common.UserError, match="gave no usable image"):
        run_sync(sync_params(params, tmp_path / "source"), tmp_path / "collection")


def test_leftover_temporary_files_of_a_killed_run_are_removed(
    params: dict[str, Any], source_folder: Path, tmp_path: Path
) -> None:
    collection = tmp_path / "collection"
    leftover = write(collection / sync_files.temporary_name("gray.png"), b"half a file")
    run_sync(sync_params(params, source_folder), collection)
    assert not leftover.exists()


def test_sync_runs_the_same_on_several_processes(params: dict[str, Any], tmp_path: Path) -> None:
    source = tmp_path / "source"
    for index in range(80):
        write(source / f"{index:03d}.jpg", image_bytes(pattern_image(48, 27, index), "JPEG"))
    settings = sync_params(params, source)
    one = sync_work.sync_collection(settings, tmp_path / "c1", None, workers=1).manifest
    second = sync_work.sync_collection(settings, tmp_path / "c2", None, workers=2)
    two, summary = second.manifest, second.summary
    pd.testing.assert_frame_equal(one, two)
    assert summary.copied == 80


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("label_from", "subfolder", "sync.label_from = 'subfolder' is not allowed; allowed: none"),
        ("max_pixels", -5, "sync.max_pixels = -5 is not allowed; expected an integer >= 1"),
        ("max_pixels", "lots", "sync.max_pixels = 'lots' is not allowed; expected an integer"),
        ("blank_max_std", -1, "sync.blank_max_std = -1 is not allowed"),
        ("mirror", "yes", "sync.mirror = 'yes' is not allowed; expected true or false"),
        ("taken_at_pattern", "YYYYMMDD", "expected a strptime pattern"),
        ("source", None, "sync.source = None is not allowed"),
        ("source", "builtin:cats", "the built-in collection is builtin:digits"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(
    params: dict[str, Any], tmp_path: Path, key: str, value: Any, words: str
) -> None:
    params["sync"][key] = value
    with pytest.raises(common.UserError) as error:
        settings = sync_work.SyncParams.from_params(params)
        sync_sources.list_source(settings.source, tmp_path / "collection")
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_param_is_named(params: dict[str, Any]) -> None:
    del params["sync"]["mirror"]
    with pytest.raises(common.UserError, match=re.escape(r"params.yaml: sync.mirror is missing")):
        sync_work.SyncParams.from_params(params)


def test_exif_time_is_read_from_the_exif_sub_ifd() -> None:
    from conftest import jpeg_with_exif

    data = jpeg_with_exif(pattern_image(16, 16), taken_at="2020:01:02 03:04:05")
    measurement = sync_files.measure_image(data, max_pixels=10**8)
    assert isinstance(measurement, sync_files.Measurement)
    assert measurement.exif_taken_at == datetime(2020, 1, 2, 3, 4, 5)


def test_a_run_that_finds_nothing_changed_writes_nothing(
    params: dict[str, Any], source_folder: Path, tmp_path: Path, monkeypatch, logged
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    params["sync"]["source"] = str(source_folder)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    outputs = [common.MANIFEST_FILE, common.REJECTED_FILE, common.REMOTE_STATE_FILE]

    def run() -> bool:
        """Run the stage; whether it found nothing to do."""
        logged.clear()
        sync_work.main()
        return "nothing to do" in logged.text

    def stamps() -> list[tuple[bytes, int]]:
        return [(path.read_bytes(), path.stat().st_mtime_ns) for path in outputs]

    assert not run()
    written = stamps()
    assert run()
    assert stamps() == written, "outputs untouched"

    # Each change makes the next run do the work; the one after finds nothing again.
    def source_touched() -> None:
        os.utime(source_folder / "gray.png", ns=(10**18, 10**18))

    def file_added() -> None:
        write(source_folder / "new.jpg", image_bytes(pattern_image(30, 20, seed=7), "JPEG"))

    def copy_removed() -> None:
        (common.COLLECTION_DIR / "gray.png").unlink()

    def param_changed() -> None:
        params["sync"]["blank_max_std"] = 3.0
        (project / "params.yaml").write_text(yaml.safe_dump(params))

    def manifest_replaced() -> None:
        table = pd.read_parquet(common.MANIFEST_FILE)
        common.write_parquet(table.iloc[1:], common.MANIFEST_FILE)

    for change in (source_touched, file_added, copy_removed, param_changed, manifest_replaced):
        change()
        assert not run(), change.__name__
        assert run(), change.__name__
    assert (common.COLLECTION_DIR / "gray.png").exists()
    assert "new.jpg" in set(pd.read_parquet(common.MANIFEST_FILE)["path"])
    assert len(pd.read_parquet(common.MANIFEST_FILE)) == len(good_image_files()) + 1


def test_the_stage_finds_nothing_changed_before_loading_pandas(
    params: dict[str, Any], source_folder: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    params["sync"]["source"] = str(source_folder)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    code = (
        "import runpy, sys\n"
        "runpy.run_module('stages.sync', run_name='__main__')\n"
        "print('pandas' in sys.modules, 'numpy' in sys.modules)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WORKERS": "1"}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=project,
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        )

    first = run()  # the work: the stage ends its process once its outputs are written
    assert first.stdout == "" and "copied" in first.stderr
    manifest = (project / common.MANIFEST_FILE).read_bytes()
    second = run()
    assert second.stdout.split() == ["False", "False"]
    assert re.fullmatch(
        r"sync: \d+ source files, the collection, the params and the outputs are as the last "
        r"run left them: nothing to do; \d+\.\d s\n",
        second.stderr,
    )
    assert (project / common.MANIFEST_FILE).read_bytes() == manifest
    write(source_folder / "new.jpg", image_bytes(pattern_image(30, 20, seed=7), "JPEG"))
    third = run()
    assert "1 copied" in third.stderr and third.stdout == ""


def test_the_check_reads_the_paths_and_code_the_stage_uses() -> None:
    assert sync_last_run.PARAMS_FILE == settings.PARAMS_FILE
    assert sync_last_run.COLLECTION_DIR == common.COLLECTION_DIR
    assert sync_last_run.OUTPUT_FILES == (
        common.MANIFEST_FILE,
        common.REJECTED_FILE,
        common.REMOTE_STATE_FILE,
    )
    assert sync_last_run.LAST_RUN_FILE.parent.parent == common.CACHE_DIR
    assert set(sync_last_run.REMOTE_PREFIXES) == {remote.S3_PREFIX, *remote.HTTP_PREFIXES}
    # Every module whose code decides what sync writes is in the digest.
    from test_params import imported_stage_modules

    deciding = imported_stage_modules("sync") - {
        "settings",  # checks params
        "project_lock",  # refuses a second run
        "native_logs",
        "stage_log",  # log lines
        "stage_usage",  # reports what a run cost
        "compute",  # where the work runs, never what it gives
        "sync_last_run",  # the check itself
    }
    assert {path.stem for path in sync_last_run.CODE_FILES} == deciding | {"sync"}


def test_measurements_made_by_other_code_are_made_again(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    manifest = pd.DataFrame({"id": ["a"], "path": ["a.png"]})
    common.write_parquet(manifest, common.MANIFEST_FILE, keys={"measurement": "health-0"})
    assert sync_work.read_previous_manifest(common.MANIFEST_FILE) is None
    current = {"measurement": image_health.MEASUREMENT_VERSION}
    common.write_parquet(manifest, common.MANIFEST_FILE, keys=current)
    pd.testing.assert_frame_equal(sync_work.read_previous_manifest(common.MANIFEST_FILE), manifest)
    common.write_parquet(manifest, common.MANIFEST_FILE)  # written before versions existed
    assert sync_work.read_previous_manifest(common.MANIFEST_FILE) is None
