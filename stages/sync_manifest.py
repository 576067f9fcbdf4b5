"""sync's manifest: ids, times, places from the locations history, labels and flags of
every accepted image.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from stages import common, image_health
from stages.sync_files import FileOutcome, Measurement

HISTORY_HEADER = ["lat", "lon", "id", "place"]
HISTORY_MAX_BYTES = 256 * 2**20  # a million located images take about 50 MB
HISTORY_MAX_LINE = 4096  # characters; a longer line is counted as malformed
# The pixel measurements of image_health.HealthScores beyond pixel_std, as columns.
HEALTH_COLUMNS = ["phash", "phash_mirror", "dark", "light", "sharpness", "entropy", "colorfulness"]
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
    *HEALTH_COLUMNS,
]


@dataclass(frozen=True)
class Description:
    """How sync describes images (from its params)."""

    taken_at_pattern: str | None
    label_from: str
    blank_max_std: float


def file_stem(path: str) -> str:
    """The name of a POSIX path without its last suffix, as PurePosixPath(path).stem gives
    (`a/b.tar.gz` -> b.tar, `.profile` -> .profile), without pathlib's parsing cost."""
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


def assign_ids(paths: list[str]) -> list[str]:
    """Stable image ids: the file stem where no other file shares it, else the relative path."""
    stems = [file_stem(path) for path in paths]
    stem_counts = Counter(stems)
    ids = [stem if stem_counts[stem] == 1 else path for stem, path in zip(stems, paths)]
    # A unique stem can still equal another file's path id ("a.png" stem of "a.png.jpg").
    id_counts = Counter(ids)
    return [path if id_counts[image_id] > 1 else image_id for image_id, path in zip(ids, paths)]


def taken_at_from_names(paths: list[str], pattern: str | None) -> pd.Series:
    """The time in each file name such as 20170512-103200.jpg (NaT where it does not match),
    parsed as datetime.strptime would, for the whole list at once."""
    if pattern is None:
        return pd.Series(pd.NaT, index=range(len(paths)), dtype="datetime64[ns]")
    stems = pd.Series([file_stem(path) for path in paths], dtype="object")
    return pd.to_datetime(stems, format=pattern, errors="coerce", exact=True)


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

    Lines end at \\n only (a U+2028 inside a place stays in the place). Empty fields become
    nulls; a place may itself hold ';'. A line without four fields, an empty id, a
    coordinate that is not a number in range, or a line over HISTORY_MAX_LINE characters
    is counted as malformed and skipped. A header line is skipped; a repeated id keeps its
    last line.
    """
    report = HistoryReport()
    rows: dict[str, tuple[float | None, float | None, str | None]] = {}
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.strip().lstrip("\ufeff")
        if not line:
            continue
        report.lines += 1
        if len(line) > HISTORY_MAX_LINE:
            report.malformed_lines.append(number)
            continue
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
    """Read and parse a history file, with a clear error naming it when it cannot be read.

    Only a regular file of at most HISTORY_MAX_BYTES is read: a device such as /dev/zero
    or a named pipe would never end.
    """
    path = Path(path_text).expanduser()
    try:
        # Non-blocking, so that opening a named pipe with no writer returns at once.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise common.UserError(f"sync.history: file {path} does not exist") from None
    except OSError as error:
        raise common.UserError(f"sync.history: cannot read {path}: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as file:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise common.UserError(f"sync.history: {path} is not a regular file")
        if status.st_size > HISTORY_MAX_BYTES:
            raise common.UserError(
                f"sync.history: {path} has {status.st_size} bytes, over the "
                f"{HISTORY_MAX_BYTES} a locations history may have"
            )
        try:
            data = file.read(HISTORY_MAX_BYTES + 1)
        except OSError as error:
            raise common.UserError(f"sync.history: cannot read {path}: {error.strerror}") from None
    if len(data) > HISTORY_MAX_BYTES:  # it grew while being read
        raise common.UserError(f"sync.history: {path} is over {HISTORY_MAX_BYTES} bytes")
    return parse_history(data.decode("utf-8", errors="replace"))


# What measuring tells of each accepted file, as columns (the label is the one the source
# gave, None where it gave none).
MEASURED_COLUMNS = {
    "path": "str",
    "label": "str",
    "sha256": "str",
    "bytes": "int64",
    "width": "int32",
    "height": "int32",
    "pixel_std": "float64",
    "exif_taken_at": "datetime64[ms]",
    **{column: "str" if column.startswith("phash") else "float64" for column in HEALTH_COLUMNS},
}


def measured_table(outcomes: list[FileOutcome]) -> pd.DataFrame:
    """The measurements of the accepted outcomes (MEASURED_COLUMNS)."""
    rows = [
        (
            outcome.relative_path,
            outcome.label,
            m.sha256,
            m.bytes,
            m.width,
            m.height,
            m.health.pixel_std,
            m.exif_taken_at,
            *(getattr(m.health, column) for column in HEALTH_COLUMNS),
        )
        for outcome in outcomes
        if (m := outcome.measurement) is not None
    ]
    table = pd.DataFrame(rows, columns=list(MEASURED_COLUMNS))
    table["exif_taken_at"] = pd.to_datetime(table["exif_taken_at"])
    return table.astype(MEASURED_COLUMNS)


def holds_measurements(previous: pd.DataFrame | None) -> bool:
    """Whether a previous manifest holds every measurement (one written before a score
    existed is measured again)."""
    return previous is not None and set(MEASURED_COLUMNS) <= set(previous.columns)


def reusable_manifest(previous: pd.DataFrame | None) -> pd.DataFrame | None:
    """The previous manifest indexed by path, when it holds every measurement."""
    if previous is None or not holds_measurements(previous):
        return None
    return previous.set_index("path", drop=False)


def reused_table(
    previous: pd.DataFrame, paths: list[str], labels: list[str | None]
) -> pd.DataFrame:
    """The measurements of unchanged files, taken from the previous manifest
    (reusable_manifest) without reading the files, with the labels their source gives."""
    table = previous.loc[paths, list(MEASURED_COLUMNS)].reset_index(drop=True)
    table["label"] = pd.Series(labels, dtype="object")
    return table.astype(MEASURED_COLUMNS)


def build_manifest(
    measured: pd.DataFrame,
    description: Description,
    history: pd.DataFrame | None,
) -> pd.DataFrame:
    """One row per measured image (measured_table, reused_table), sorted by path, with ids,
    times, places, labels and flags."""
    measured = measured.sort_values("path", ignore_index=True)
    paths = measured["path"].tolist()
    name_times = taken_at_from_names(paths, description.taken_at_pattern)
    labels = measured["label"]
    if description.label_from == "folder":
        folders = pd.Series([label_from_folder(path) for path in paths], dtype="str")
        labels = labels.fillna(folders)
    manifest = measured.assign(
        id=pd.Series(assign_ids(paths), dtype="str"),
        label=labels.astype("str"),
        taken_at=name_times.astype("datetime64[ms]").fillna(measured["exif_taken_at"]).to_numpy(),
    )
    manifest["blank"] = manifest["pixel_std"] < description.blank_max_std
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
    """The previous manifest's rows by path (see reusable_manifest), as dicts: remote
    objects are reused one outcome at a time, with their ETags."""
    if previous is None or not holds_measurements(previous):
        return {}
    columns = previous.columns.tolist()
    # Column lists zipped into rows: several times faster than to_dict("records").
    rows = zip(*(previous[column].tolist() for column in columns), strict=True)
    return {str(row["path"]): row for row in (dict(zip(columns, values)) for values in rows)}


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
        health=image_health.HealthScores(
            pixel_std=float(row["pixel_std"]),
            **{
                column: str(row[column]) if column.startswith("phash") else float(row[column])
                for column in HEALTH_COLUMNS
            },
        ),
        exif_taken_at=exif_taken_at and pd.Timestamp(exif_taken_at).to_pydatetime(),
    )
    return FileOutcome(str(row["path"]), measurement, label=label)
