"""sync: bring images from a source into the collection and describe every one of them.

Params (params.yaml, section sync):
  source            a folder (searched recursively), s3://bucket/prefix, a list of image
                    URLs (an http(s) URL or a local .txt file, one URL per line), or
                    builtin:digits (the demo)
  history           optional locations file of `lat;lon;id;place` lines, joined on id
  taken_at_pattern  strptime pattern matched against file names (ISS: %Y%m%d-%H%M%S)
  label_from        none | folder (the top-level sub-folder names the label)
  max_pixels        images with more pixels are rejected (decompression bombs)
  blank_max_std     frames whose gray levels vary less than this are flagged blank
  mirror            also remove collection files that the source no longer has
  s3_endpoint_url   an S3-compatible server (MinIO, Ceph...), or null for AWS
  timeout           seconds to connect to a remote source and to wait for each read
  retries           further tries of a failed download, waiting retry_wait seconds
  retry_wait        before the first retry, twice as long before each next one
  max_bytes         larger files are refused (remote ones without being downloaded)
Inputs:  the source; the history file when set
Outputs: data/raw/collections/ (the images), data/raw/manifest.parquet, data/raw/rejected.csv,
         data/raw/remote.parquet (path, url, etag, size, reason of each remote object seen,
         so that the next run fetches only new or changed ones; empty for local sources)

Every file is decoded before it is accepted; a bad file goes to rejected.csv with its
reason and the rest goes on. A second run copies only new or changed files, and the
source is only ever read.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from stages import common, remote

STAGE = "sync"
BUILTIN_DIGITS = "builtin:digits"
REMOTE_STATE_FILE = common.RAW_DIR / "remote.parquet"
REMOTE_STATE_COLUMNS = ["path", "url", "etag", "size", "reason"]
REMOTE_WORKERS = 8  # downloads wait on the network: more of them than cores
LABEL_SOURCES = ("none", "folder")
EXIF_IFD_TAG = 0x8769
EXIF_DATETIME_ORIGINAL_TAG = 36867
BLANK_MEASURE_SIZE = 256  # blankness is judged on a copy at most this many pixels across
TEMPORARY_SUFFIX = ".sync-tmp"
HISTORY_HEADER = ["lat", "lon", "id", "place"]
MANIFEST_COLUMNS = [
    "id",
    "path",
    "sha256",
    "bytes",
    "width",
    "height",
    "taken_at",
    "latitude",
    "longitude",
    "place",
    "label",
    "blank",
    "duplicate",
    "duplicate_of",
    "pixel_std",
    "exif_taken_at",
]


@dataclass(frozen=True)
class SyncParams:
    """The sync section of params.yaml, checked."""

    source: str
    history: str | None
    taken_at_pattern: str | None
    label_from: str
    max_pixels: int
    blank_max_std: float
    mirror: bool
    remote: remote.RemoteSettings

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SyncParams:
        """Read and check every sync param; the first bad one raises a UserError."""
        source = common.optional_str_param(params, "sync.source")
        if source is None:
            raise common.param_error(
                "sync.source",
                source,
                f"expected a folder, s3://bucket/prefix, a URL list or {BUILTIN_DIGITS}",
            )
        endpoint = common.optional_str_param(params, "sync.s3_endpoint_url")
        if endpoint is not None and not endpoint.startswith(remote.HTTP_PREFIXES):
            raise common.param_error(
                "sync.s3_endpoint_url", endpoint, "expected http(s)://host:port, or null for AWS"
            )
        timeout = common.number_param(params, "sync.timeout", minimum=0.001)
        pattern = common.optional_str_param(params, "sync.taken_at_pattern")
        if pattern is not None and "%" not in pattern:
            raise common.param_error(
                "sync.taken_at_pattern",
                pattern,
                "expected a strptime pattern such as %Y%m%d-%H%M%S",
            )
        return cls(
            source=source,
            history=common.optional_str_param(params, "sync.history"),
            taken_at_pattern=pattern,
            label_from=common.choice_param(params, "sync.label_from", LABEL_SOURCES),
            max_pixels=common.int_param(params, "sync.max_pixels", minimum=1),
            blank_max_std=common.number_param(params, "sync.blank_max_std", minimum=0),
            mirror=common.bool_param(params, "sync.mirror"),
            remote=remote.RemoteSettings(
                endpoint_url=endpoint,
                timeout=timeout,
                retries=common.int_param(params, "sync.retries", minimum=0),
                retry_wait=common.number_param(params, "sync.retry_wait", minimum=0),
                max_bytes=common.int_param(params, "sync.max_bytes", minimum=1),
            ),
        )


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceFile:
    """One file a source offers: where it lands in the collection and how to get its bytes."""

    relative_path: str  # POSIX path inside the collection
    size: int
    mtime_ns: int | None = None  # None for generated files, which have no time
    local_path: Path | None = None  # set for files of a folder source
    content: bytes | None = None  # set for generated files (the built-in demo)
    label: str | None = None  # ground truth the source itself knows
    remote: remote.RemoteObject | None = None  # set for files of an S3 or URL-list source
    known: dict[str, Any] | None = None  # remote: what the last run saw (REMOTE_STATE_COLUMNS)


def read_source_bytes(item: SourceFile) -> bytes:
    """The bytes of a local or generated source file."""
    if item.content is not None:
        return item.content
    assert item.local_path is not None
    return item.local_path.read_bytes()


def is_unchanged(item: SourceFile, destination: Path) -> bool:
    """True when the collection already holds this source file as it is now.

    Folder files compare size and modification time, as rsync does; generated files
    compare bytes.
    """
    try:
        status = destination.stat()
    except FileNotFoundError:
        return False
    if status.st_size != item.size:
        return False
    if item.content is not None:
        return destination.read_bytes() == item.content
    return status.st_mtime_ns == item.mtime_ns


def digits_source_files() -> list[SourceFile]:
    """The demo: scikit-learn's 1,797 handwritten digits as 32x32 grayscale PNGs.

    Each 8x8 digit (levels 0-16) is scaled to 0-255 and enlarged 4x by repeating pixels,
    so no value is invented. Files are `<digit>/digit-<index>.png`, labelled by digit.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    files = []
    for index, (levels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        gray = np.rint(levels * (255.0 / 16.0)).astype(np.uint8)
        enlarged = np.kron(gray, np.ones((4, 4), dtype=np.uint8))
        buffer = io.BytesIO()
        Image.fromarray(enlarged, mode="L").save(buffer, format="PNG")
        content = buffer.getvalue()
        files.append(
            SourceFile(
                relative_path=f"{target}/digit-{index:04d}.png",
                size=len(content),
                content=content,
                label=str(target),
            )
        )
    return files


def folder_source_files(folder: Path) -> tuple[list[SourceFile], int]:
    """Every regular file under `folder`, sorted by path, and how many hidden ones were skipped.

    Hidden files and folders (.DS_Store, .git) are skipped; symbolic links are not followed
    into folders.
    """
    files: list[SourceFile] = []
    hidden = 0
    for directory, subdirectories, names in os.walk(folder):
        hidden += sum(name.startswith(".") for name in subdirectories)
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                hidden += 1
                continue
            path = Path(directory) / name
            try:
                status = path.stat()
            except OSError:
                continue  # a dangling link: nothing to read
            if not path.is_file():
                continue
            relative = path.relative_to(folder).as_posix()
            files.append(SourceFile(relative, status.st_size, status.st_mtime_ns, local_path=path))
    files.sort(key=lambda item: item.relative_path)
    return files, hidden


def remote_source_files(
    source: str, settings: remote.RemoteSettings, state: dict[str, dict[str, Any]]
) -> tuple[list[SourceFile], int, list[tuple[str, str]]]:
    """The objects of an S3 or URL-list source, with what the last run saw of each; the
    count of hidden ones skipped; and (name, reason) of those refused at listing."""
    objects, refused, hidden = remote.list_remote(source, settings)
    files = [
        SourceFile(
            item.relative_path,
            item.size if item.size is not None else 0,
            remote=item,
            known=state.get(item.relative_path),
        )
        for item in objects
    ]
    return files, hidden, refused


def list_source(source: str, collection: Path) -> tuple[list[SourceFile], int]:
    """The files a local or built-in source offers and the count of hidden files skipped.

    Raises a UserError naming the source when it cannot be read.
    """
    if source == BUILTIN_DIGITS:
        return digits_source_files(), 0
    if source.startswith("builtin:"):
        raise common.param_error(
            "sync.source", source, f"the built-in collection is {BUILTIN_DIGITS}"
        )
    folder = Path(source).expanduser()
    if not folder.exists():
        raise common.UserError(f"sync.source: folder {folder} does not exist")
    if not folder.is_dir():
        raise common.UserError(f"sync.source: {folder} is not a folder")
    resolved, collection_resolved = folder.resolve(), collection.resolve()
    if resolved == collection_resolved or collection_resolved in resolved.parents:
        raise common.UserError(f"sync.source: {folder} is inside the collection {collection}")
    if resolved in collection_resolved.parents:
        raise common.UserError(f"sync.source: {folder} contains the collection {collection}")
    return folder_source_files(folder)


def collection_files(collection: Path) -> list[str]:
    """Relative POSIX paths of the files in the collection, hidden ones left out."""
    if not collection.exists():
        return []
    return [item.relative_path for item in folder_source_files(collection)[0]]


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Measurement:
    """What decoding one image file tells."""

    sha256: str
    bytes: int
    width: int  # upright, after the EXIF orientation
    height: int
    pixel_std: float  # spread of gray levels: near 0 for a blank frame
    exif_taken_at: datetime | None


def read_exif_taken_at(image: Image.Image) -> datetime | None:
    """EXIF DateTimeOriginal of an opened image, or None when absent or malformed."""
    try:
        value = image.getexif().get_ifd(EXIF_IFD_TAG).get(EXIF_DATETIME_ORIGINAL_TAG)
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        return datetime.strptime(str(value).strip("\x00 "), "%Y:%m:%d %H:%M:%S")
    except Exception:  # absent, or written by a camera that got the format wrong
        return None


def measure_image(data: bytes, max_pixels: int) -> Measurement | str:
    """Decode image bytes and measure them; return the rejection reason if they are no good.

    The file's structure is verified, then it is decoded: JPEGs at reduced DCT scale,
    which still reads every coded block, so a truncated or corrupt file fails here as it
    would at full size.
    """
    if not data:
        return "empty file (0 bytes)"
    try:
        # verify() checks what decoding alone lets pass, such as PNG chunk checksums:
        # a damaged PNG can decode without an error into wrong pixels.
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.size[0] * image.size[1]
            if pixels > max_pixels:
                width, height = image.size
                return f"{width}x{height} = {pixels} pixels is over sync.max_pixels = {max_pixels}"
            width, height = common.upright_size(image)
            exif_taken_at = read_exif_taken_at(image)
            image.draft(None, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
            image.load()
            small = common.to_rgb(image)
            small.thumbnail((BLANK_MEASURE_SIZE, BLANK_MEASURE_SIZE), Image.Resampling.BOX)
            pixel_std = float(np.asarray(small.convert("L"), dtype=np.float32).std())
    except Image.UnidentifiedImageError:
        return "not an image (format not recognized)"
    except Exception as error:  # any decoder failure means the file is unusable
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"cannot decode: {message}"
    return Measurement(
        sha256=common.sha256_hex(data),
        bytes=len(data),
        width=width,
        height=height,
        pixel_std=round(pixel_std, 4),
        exif_taken_at=exif_taken_at,
    )


@dataclass(frozen=True)
class FileOutcome:
    """What became of one file: measured (maybe copied), or rejected with a reason."""

    relative_path: str
    measurement: Measurement | None
    reason: str | None = None
    copied: bool = False
    label: str | None = None
    etag: str | None = None  # remote files: the version measured (or rejected)


def bring_source_file(item: SourceFile, collection: Path, max_pixels: int) -> FileOutcome:
    """Measure a source file and, if it is a good image, copy it into the collection.

    The copy goes to a hidden temporary name and is renamed into place, so the collection
    never holds a partial file. A file the collection already has is only measured.
    """
    if item.remote is not None:
        return bring_remote_file(item, collection, max_pixels)
    if is_unchanged(item, collection / item.relative_path):
        return measure_collection_file(item.relative_path, collection, max_pixels, item.label)
    try:
        data = read_source_bytes(item)
    except OSError as error:
        return FileOutcome(item.relative_path, None, f"cannot read: {error.strerror or error}")
    return store_source_bytes(item, data, collection, max_pixels)


def bring_remote_file(item: SourceFile, collection: Path, max_pixels: int) -> FileOutcome:
    """Download a remote object (retried), measure it and store it like a local file.

    A URL whose server answers that the copy we have is current (HTTP 304) is not
    downloaded again: the collection's copy is measured, or its old rejection kept.
    """
    assert item.remote is not None
    known = item.known or {}
    destination = collection / item.relative_path
    have_copy = destination.exists() or bool(known.get("reason"))
    try:
        fetched = remote.fetch(item.remote, known.get("etag") if have_copy else None)
    except remote.TooLargeError as error:
        return FileOutcome(item.relative_path, None, str(error), etag=error.etag)
    except remote.FetchError as error:
        return FileOutcome(item.relative_path, None, f"download failed: {error}")
    if fetched.data is None:
        if known.get("reason"):
            return FileOutcome(item.relative_path, None, known["reason"], etag=fetched.etag)
        outcome = measure_collection_file(item.relative_path, collection, max_pixels, item.label)
        return replace(outcome, etag=fetched.etag)
    outcome = store_source_bytes(item, fetched.data, collection, max_pixels)
    return replace(outcome, etag=fetched.etag)


def store_source_bytes(
    item: SourceFile, data: bytes, collection: Path, max_pixels: int
) -> FileOutcome:
    """Measure a source file's bytes and, if they are a good image, put them in place."""
    destination = collection / item.relative_path
    result = measure_image(data, max_pixels)
    if isinstance(result, str):
        return FileOutcome(item.relative_path, None, result, label=item.label)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}{TEMPORARY_SUFFIX}")
    try:
        temporary.write_bytes(data)
        if item.mtime_ns is not None:
            os.utime(temporary, ns=(item.mtime_ns, item.mtime_ns))
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)
    return FileOutcome(item.relative_path, result, copied=True, label=item.label)


def measure_collection_file(
    relative_path: str, collection: Path, max_pixels: int, label: str | None = None
) -> FileOutcome:
    """Measure a file already in the collection."""
    try:
        data = (collection / relative_path).read_bytes()
    except OSError as error:
        return FileOutcome(relative_path, None, f"cannot read: {error.strerror or error}")
    result = measure_image(data, max_pixels)
    if isinstance(result, str):
        return FileOutcome(relative_path, None, result, label=label)
    return FileOutcome(relative_path, result, label=label)


def _run_task(task: tuple[Any, ...]) -> FileOutcome:
    """Pool entry point: ('source', item, collection, max_pixels) or ('collection', ...)."""
    kind, *arguments = task
    if kind == "source":
        return bring_source_file(*arguments)
    return measure_collection_file(*arguments)


# ----------------------------------------------------------------------------- describing


def assign_ids(paths: list[str]) -> list[str]:
    """Stable image ids: the file stem where no other file shares it, else the relative path."""
    stems = [PurePosixPath(path).stem for path in paths]
    stem_counts = Counter(stems)
    ids = [stem if stem_counts[stem] == 1 else path for stem, path in zip(stems, paths)]
    # A unique stem can still equal another file's path id ("a.png" stem of "a.png.jpg").
    id_counts = Counter(ids)
    return [path if id_counts[image_id] > 1 else image_id for image_id, path in zip(ids, paths)]


def taken_at_from_name(path: str, pattern: str | None) -> datetime | None:
    """The time in a file name such as 20170512-103200.jpg, or None if it does not match."""
    if pattern is None:
        return None
    try:
        return datetime.strptime(PurePosixPath(path).stem, pattern)
    except ValueError:
        return None


def label_from_folder(path: str) -> str | None:
    """The top-level sub-folder of a collection path (`cats/a/1.jpg` -> cats), else None."""
    parts = PurePosixPath(path).parts
    return parts[0] if len(parts) > 1 else None


@dataclass
class HistoryReport:
    """What reading a locations history file found."""

    lines: int = 0
    malformed_lines: list[int] = field(default_factory=list)
    repeated_ids: int = 0


def _parse_coordinate(text: str, limit: float) -> float | None:
    """A latitude or longitude in [-limit, limit]; None when empty; ValueError otherwise."""
    text = text.strip()
    if not text:
        return None
    value = float(text)
    if not -limit <= value <= limit:
        raise ValueError(f"{value} is outside [-{limit}, {limit}]")
    return value


def parse_history(text: str) -> tuple[pd.DataFrame, HistoryReport]:
    """Parse `lat;lon;id;place` lines into a table keyed on id.

    Empty fields become nulls; a place may itself hold ';'. A line without four fields, an
    empty id, or a coordinate that is not a number in range is counted as malformed and
    skipped. A header line is skipped; a repeated id keeps its last line.
    """
    report = HistoryReport()
    rows: dict[str, tuple[float | None, float | None, str | None]] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip().lstrip("\ufeff")
        if not line:
            continue
        report.lines += 1
        fields = line.split(";", 3)
        if number == 1 and [part.strip().lower() for part in fields] == HISTORY_HEADER:
            continue
        try:
            if len(fields) != 4 or not fields[2].strip():
                raise ValueError("expected four fields and an id")
            latitude = _parse_coordinate(fields[0], 90.0)
            longitude = _parse_coordinate(fields[1], 180.0)
        except ValueError:
            report.malformed_lines.append(number)
            continue
        image_id = fields[2].strip()
        if image_id in rows:
            report.repeated_ids += 1
        rows[image_id] = (latitude, longitude, fields[3].strip() or None)
    table = pd.DataFrame(
        [(image_id, *values) for image_id, values in rows.items()],
        columns=["id", "latitude", "longitude", "place"],
    )
    return table.astype({"latitude": "float64", "longitude": "float64"}), report


def read_history(path_text: str) -> tuple[pd.DataFrame, HistoryReport]:
    """Read and parse a history file, with a clear error naming it when it cannot be read."""
    path = Path(path_text).expanduser()
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise common.UserError(f"sync.history: file {path} does not exist") from None
    except OSError as error:
        raise common.UserError(f"sync.history: cannot read {path}: {error.strerror}") from None
    return parse_history(text)


def build_manifest(
    outcomes: list[FileOutcome],
    params: SyncParams,
    history: pd.DataFrame | None,
) -> pd.DataFrame:
    """One row per accepted image, sorted by path, with ids, times, places, labels and flags."""
    accepted = sorted(
        (outcome for outcome in outcomes if outcome.measurement is not None),
        key=lambda outcome: outcome.relative_path,
    )
    paths = [outcome.relative_path for outcome in accepted]
    measurements = [outcome.measurement for outcome in accepted]
    assert all(measurement is not None for measurement in measurements)
    ids = assign_ids(paths)
    name_times = [taken_at_from_name(path, params.taken_at_pattern) for path in paths]
    exif_times = [measurement.exif_taken_at for measurement in measurements]  # type: ignore[union-attr]
    labels = [
        outcome.label
        if outcome.label is not None
        else (label_from_folder(outcome.relative_path) if params.label_from == "folder" else None)
        for outcome in accepted
    ]
    manifest = pd.DataFrame(
        {
            "id": pd.Series(ids, dtype="str"),
            "path": pd.Series(paths, dtype="str"),
            "sha256": pd.Series([m.sha256 for m in measurements], dtype="str"),  # type: ignore[union-attr]
            "bytes": pd.Series([m.bytes for m in measurements], dtype="int64"),  # type: ignore[union-attr]
            "width": pd.Series([m.width for m in measurements], dtype="int32"),  # type: ignore[union-attr]
            "height": pd.Series([m.height for m in measurements], dtype="int32"),  # type: ignore[union-attr]
            "taken_at": pd.to_datetime(
                [name or exif for name, exif in zip(name_times, exif_times, strict=True)]
            ).astype("datetime64[ms]"),
            "label": pd.Series(labels, dtype="str"),
            "pixel_std": pd.Series([m.pixel_std for m in measurements], dtype="float64"),  # type: ignore[union-attr]
            "exif_taken_at": pd.to_datetime(exif_times).astype("datetime64[ms]"),
        }
    )
    manifest["blank"] = manifest["pixel_std"] < params.blank_max_std
    first_with_content = manifest.groupby("sha256", sort=False)["id"].transform("first")
    manifest["duplicate"] = first_with_content != manifest["id"]
    manifest["duplicate_of"] = first_with_content.where(manifest["duplicate"]).astype("str")
    if history is None:
        history = pd.DataFrame({"id": pd.Series(dtype="str")})
    locations = history.reindex(columns=["id", "latitude", "longitude", "place"])
    manifest = manifest.merge(locations, on="id", how="left", validate="one_to_one")
    manifest["latitude"] = manifest["latitude"].astype("float64")
    manifest["longitude"] = manifest["longitude"].astype("float64")
    manifest["place"] = manifest["place"].astype("str")
    return manifest[MANIFEST_COLUMNS]


def reusable_rows(previous: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """The previous manifest's rows by path, to reuse for files that did not change."""
    needed = {"path", "sha256", "bytes", "width", "height", "pixel_std", "exif_taken_at", "label"}
    if previous is None or not needed <= set(previous.columns):
        return {}
    return {str(row["path"]): row for row in previous.to_dict("records")}


def outcome_from_row(row: dict[str, Any], label: str | None) -> FileOutcome:
    """Rebuild a file's outcome from its previous manifest row, without reading the file."""
    exif_taken_at = row["exif_taken_at"]
    if pd.isna(exif_taken_at):
        exif_taken_at = None
    measurement = Measurement(
        sha256=str(row["sha256"]),
        bytes=int(row["bytes"]),
        width=int(row["width"]),
        height=int(row["height"]),
        pixel_std=float(row["pixel_std"]),
        exif_taken_at=exif_taken_at and pd.Timestamp(exif_taken_at).to_pydatetime(),
    )
    return FileOutcome(str(row["path"]), measurement, label=label)


# ----------------------------------------------------------------------------- the stage


@dataclass
class SyncSummary:
    """Counts of what one sync run did."""

    offered: int = 0
    copied: int = 0
    rejected: int = 0
    kept: int = 0  # in the collection, no longer in the source, kept because mirror is off
    removed: int = 0  # removed because mirror is on
    hidden_skipped: int = 0


@dataclass
class SyncResult:
    """What a sync run gives: the tables it writes and its counts."""

    manifest: pd.DataFrame
    rejected: pd.DataFrame  # path, reason
    summary: SyncSummary
    history: HistoryReport | None
    remote_state: pd.DataFrame  # REMOTE_STATE_COLUMNS; empty for local sources


def sync_collection(
    params: SyncParams,
    collection: Path,
    previous_manifest: pd.DataFrame | None,
    workers: int,
    previous_remote: pd.DataFrame | None = None,
) -> SyncResult:
    """Bring the source into `collection`; return the manifest, the rejected table and counts.

    Files the source lost stay in the collection and the manifest unless params.mirror is
    set. Measurements are reused from `previous_manifest` for files that did not change;
    remote objects whose ETag and size match `previous_remote` are not downloaded again.
    """
    history, history_report = (None, None)
    if params.history is not None:
        history, history_report = read_history(params.history)
    refused: list[tuple[str, str]] = []
    if remote.is_remote(params.source):
        state = remote_state_rows(previous_remote)
        source_files, hidden, refused = remote_source_files(params.source, params.remote, state)
        workers = max(workers, REMOTE_WORKERS)
    else:
        source_files, hidden = list_source(params.source, collection)
    summary = SyncSummary(offered=len(source_files) + len(refused), hidden_skipped=hidden)
    collection.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(collection)

    previous_rows = reusable_rows(previous_manifest)
    outcomes: list[FileOutcome] = [FileOutcome(name, None, reason) for name, reason in refused]
    tasks: list[tuple[Any, ...]] = []
    for item in source_files:
        row = previous_rows.get(item.relative_path)
        if item.remote is not None:
            reused = reuse_remote_outcome(item, row, collection)
            if reused is not None:
                outcomes.append(reused)
                continue
        elif row is not None and is_unchanged(item, collection / item.relative_path):
            outcomes.append(outcome_from_row(row, item.label))
            continue
        tasks.append(("source", item, collection, params.max_pixels))

    offered_paths = {item.relative_path for item in source_files}
    leftovers = [path for path in collection_files(collection) if path not in offered_paths]
    if params.mirror:
        for path in leftovers:
            (collection / path).unlink()
        summary.removed = len(leftovers)
        remove_empty_folders(collection)
    else:
        summary.kept = len(leftovers)
        for path in leftovers:
            row = previous_rows.get(path)
            if row is not None and (collection / path).stat().st_size == int(row["bytes"]):
                label = None if pd.isna(row["label"]) else str(row["label"])
                outcomes.append(outcome_from_row(row, label))
            else:
                tasks.append(("collection", path, collection, params.max_pixels))

    outcomes.extend(run_tasks(tasks, workers))
    rejected = pd.DataFrame(
        [(outcome.relative_path, outcome.reason) for outcome in outcomes if outcome.reason],
        columns=["path", "reason"],
    ).sort_values("path", ignore_index=True)
    summary.copied = sum(outcome.copied for outcome in outcomes)
    summary.rejected = len(rejected)
    manifest = build_manifest(outcomes, params, history)
    if manifest.empty:
        raise common.UserError(
            f"sync.source: {params.source} gave no usable image"
            + (f" ({len(rejected)} rejected; see the reasons above)" if len(rejected) else "")
        )
    remote_state = remote_state_table(source_files, outcomes)
    return SyncResult(manifest, rejected, summary, history_report, remote_state)


def remote_state_rows(previous: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """The last run's remote state by path (empty when there is none)."""
    if previous is None or not set(REMOTE_STATE_COLUMNS) <= set(previous.columns):
        return {}
    rows = previous.astype(object).where(previous.notna(), None).to_dict("records")
    return {str(row["path"]): row for row in rows}


def reuse_remote_outcome(
    item: SourceFile, row: dict[str, Any] | None, collection: Path
) -> FileOutcome | None:
    """The outcome of a remote object that has not changed since the last run (same ETag
    and size, its copy in place or its rejection on record), without downloading it;
    None when it must be fetched. URL lists tell no ETag: the server is asked instead."""
    assert item.remote is not None
    known = item.known
    if known is None or item.remote.etag is None or known.get("etag") != item.remote.etag:
        return None
    if known.get("size") is None or int(known["size"]) != item.size:
        return None
    if known.get("reason"):
        return FileOutcome(item.relative_path, None, str(known["reason"]), etag=item.remote.etag)
    destination = collection / item.relative_path
    if row is None or not destination.exists() or destination.stat().st_size != item.size:
        return None
    return replace(outcome_from_row(row, item.label), etag=item.remote.etag)


def remote_state_table(source_files: list[SourceFile], outcomes: list[FileOutcome]) -> pd.DataFrame:
    """What this run saw of each remote object, for the next run to compare against.

    A failed download has no ETag in its outcome, so the next run tries it again.
    """
    by_path = {outcome.relative_path: outcome for outcome in outcomes}
    rows = []
    for item in source_files:
        outcome = by_path.get(item.relative_path)
        if item.remote is None or outcome is None:
            continue
        size = outcome.measurement.bytes if outcome.measurement is not None else item.size
        rows.append(
            {
                "path": item.relative_path,
                "url": item.remote.url,
                "etag": outcome.etag,
                "size": size,
                "reason": outcome.reason,
            }
        )
    table = pd.DataFrame(rows, columns=REMOTE_STATE_COLUMNS)
    return table.astype(
        {"path": str, "url": str, "etag": object, "size": "Int64", "reason": object}
    )


def run_tasks(tasks: list[tuple[Any, ...]], workers: int) -> list[FileOutcome]:
    """Run file tasks on `workers` processes, with progress."""
    results = common.map_in_processes(_run_task, tasks, workers, chunksize=16)
    return list(common.progress(results, len(tasks), STAGE))


def remove_temporary_files(collection: Path) -> None:
    """Delete this stage's own temporary files that a killed run left behind."""
    for temporary in collection.rglob(f".*{TEMPORARY_SUFFIX}"):
        temporary.unlink(missing_ok=True)


def remove_empty_folders(collection: Path) -> None:
    """Remove folders that mirroring left empty, deepest first."""
    for directory in sorted(collection.rglob("*"), key=lambda path: len(path.parts), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def read_previous_manifest(path: Path) -> pd.DataFrame | None:
    """The manifest of the last run, if there is a readable one."""
    try:
        return pd.read_parquet(path)
    except Exception:  # absent or unreadable: measure everything again
        return None


def main() -> None:
    """Read params, sync the collection, write the manifest and the rejected list."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = SyncParams.from_params(common.load_params())
    result = sync_collection(
        params,
        common.COLLECTION_DIR,
        read_previous_manifest(common.MANIFEST_FILE),
        common.worker_count(),
        read_previous_manifest(REMOTE_STATE_FILE),
    )
    manifest, rejected, summary = result.manifest, result.rejected, result.summary
    history_report = result.history
    common.write_parquet(manifest, common.MANIFEST_FILE)
    common.write_bytes_atomic(rejected.to_csv(index=False).encode("utf-8"), common.REJECTED_FILE)
    common.write_parquet(result.remote_state, REMOTE_STATE_FILE)

    for path, reason in rejected.itertuples(index=False):
        logger.warning("rejected %s: %s", path, reason)
    if history_report is not None:
        located = int(manifest["latitude"].notna().sum())
        logger.info(
            "history: %d lines, %d malformed%s, %d repeated ids, %d images located",
            history_report.lines,
            len(history_report.malformed_lines),
            f" (lines {', '.join(map(str, history_report.malformed_lines[:10]))})"
            if history_report.malformed_lines
            else "",
            history_report.repeated_ids,
            located,
        )
    seconds = time.perf_counter() - started
    logger.info(
        "%d images from %d source files: %d copied, %d rejected, %d kept from earlier, "
        "%d removed (mirror), %d hidden skipped; %d blank, %d duplicate; %.1f s",
        len(manifest),
        summary.offered,
        summary.copied,
        summary.rejected,
        summary.kept,
        summary.removed,
        summary.hidden_skipped,
        int(manifest["blank"].sum()),
        int(manifest["duplicate"].sum()),
        seconds,
    )


if __name__ == "__main__":
    common.run_stage(main)
