"""sync's record of its last run over a local folder, so that a run in which nothing changed
costs one walk of the source and the collection, and writes nothing.

The record (data/cache/sync/last-run.json, outside DVC) holds two digests:
- inputs: the sync section of params.yaml, sync's code, the size and modification time of
  the history file and of every file of the source folder, and the file names and folder
  times of the collection after the run (sync writes there by renaming files into place,
  which changes a folder's time; a copy edited in place by hand is not noticed);
- outputs: the bytes of the manifest, the rejected list and the remote state it wrote.
A run whose inputs and current outputs both match has nothing to do: sync is
deterministic, so doing the work again would write the same bytes. Any difference (a new,
changed or removed file, an edited param, another checkout of the outputs) makes it do
the work.

This module uses only the standard library and PyYAML: `dvc repro` runs sync every time,
and the check (compare_with_last_run) is done before Python loads pandas and the rest of
sync, which took as long again as the check itself.
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.folder_walk import FolderListing, collection_listing, list_folder
from stages.stage_log import get_logger

# As in stages/common.py (tests/test_sync.py checks), which this module does not import.
PARAMS_FILE = Path("params.yaml")
COLLECTION_DIR = Path("data/raw/collections")
OUTPUT_FILES = (
    Path("data/raw/manifest.parquet"),
    Path("data/raw/rejected.csv"),
    Path("data/raw/remote.parquet"),
)
LAST_RUN_FILE = Path("data/cache/sync/last-run.json")
REMOTE_PREFIXES = ("s3://", "http://", "https://")  # as stages/remote.py
# The code that decides what sync writes.
STAGES_DIR = Path(__file__).resolve().parent
CODE_FILES = tuple(
    STAGES_DIR / f"{name}.py"
    for name in (
        "sync",
        "sync_work",
        "common",
        "folder_walk",
        "image_health",
        "images",
        "remote",
        "sync_files",
        "sync_manifest",
        "sync_remote_state",
        "sync_sources",
    )
)


@dataclass(frozen=True)
class LastRun:
    """The digests of a sync run's inputs and outputs."""

    inputs: str
    outputs: str


@dataclass(frozen=True)
class Comparison:
    """What the check found: whether anything changed since the last run, and the walks it
    made of a local source folder and the collection (None for other sources), which the
    run reuses."""

    unchanged: bool
    source_folder: Path | None = None
    source: FolderListing | None = None
    collection: FolderListing | None = None


def listing_text(listing: FolderListing) -> str:
    """A folder listing as text: one `path size mtime_ns` line a file, then one a folder
    whose time it kept, then what was left out."""
    lines = [f"{path}\0{size}\0{mtime_ns}" for path, size, mtime_ns in listing.files]
    lines.extend(f"folder\0{path}\0{mtime_ns}" for path, mtime_ns in listing.folders)
    lines.append(f"hidden\0{listing.hidden}")
    lines.extend(f"refused\0{name}\0{reason}" for name, reason in listing.refused)
    return "\n".join(lines)


def history_stamp(history: str | None) -> str | None:
    """The size and modification time of the history file ("" when none is set); None when
    it is not a regular file, which the run itself reports."""
    if not history:
        return ""
    try:
        status = Path(history).expanduser().stat()
    except OSError:
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    return f"{status.st_size}\0{status.st_mtime_ns}"


def section_of(params: Any) -> dict[str, Any]:
    """The sync section of params.yaml's contents, as written ({} when absent)."""
    section = params.get("sync") if isinstance(params, dict) else None
    return section if isinstance(section, dict) else {}


def sync_section(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The sync section of params.yaml as written ({} when absent)."""
    with open(path, encoding="utf-8") as file:
        return section_of(yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def inputs_digest(
    section: dict[str, Any],
    history: str,
    source: FolderListing,
    collection: FolderListing,
    code_files: tuple[Path, ...] = CODE_FILES,
) -> str:
    """The digest of everything a local sync run reads (`section`: params.yaml's sync
    section; `history`: its history_stamp)."""
    digest = hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode())
    for path in code_files:
        digest.update(f"\n{path.name}\n".encode())
        digest.update(path.read_bytes())
    digest.update(f"\nhistory\0{history}".encode())
    for listing in (source, collection):
        digest.update(b"\n--\n")
        digest.update(listing_text(listing).encode("utf-8", errors="surrogateescape"))
    return digest.hexdigest()


def local_inputs_digest(
    section: dict[str, Any], source: FolderListing, collection: FolderListing
) -> str | None:
    """inputs_digest of a local folder's sync; None when the history file is not a plain
    file, which the run itself reports."""
    history = history_stamp(section.get("history"))
    if history is None:
        return None
    return inputs_digest(section, history, source, collection)


def outputs_digest(paths: tuple[Path, ...] = OUTPUT_FILES) -> str | None:
    """The digest of the output files' bytes; None when one is missing."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            digest.update(path.read_bytes())
        except FileNotFoundError:
            return None
        digest.update(b"\0")
    return digest.hexdigest()


def read_last_run(path: Path = LAST_RUN_FILE) -> LastRun | None:
    """The record of the last run; None when there is none or it cannot be read."""
    try:
        values = json.loads(path.read_text())
        return LastRun(str(values["inputs"]), str(values["outputs"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_bytes(record: LastRun) -> bytes:
    """The record as the file holds it (sync writes it atomically)."""
    return json.dumps(asdict(record)).encode()


def local_folder(source: Any) -> Path | None:
    """The folder a sync.source names, when it names an existing local folder."""
    if not isinstance(source, str) or source.startswith(("builtin:", *REMOTE_PREFIXES)):
        return None
    folder = Path(source).expanduser()
    return folder if folder.is_dir() else None


def compare_with_last_run() -> Comparison:
    """Walk a local source folder and the collection and compare them, the params, the
    code and the outputs with the last run's record. Anything it cannot read (a missing
    params file, a remote source) counts as a change: the run then does the work and
    reports what is wrong."""
    try:
        section = sync_section()
    except (OSError, yaml.YAMLError):
        return Comparison(False)
    folder = local_folder(section.get("source"))
    if folder is None:
        return Comparison(False)
    source, collection = list_folder(folder), collection_listing(COLLECTION_DIR)
    last = read_last_run()
    unchanged = (
        last is not None
        and last.inputs == local_inputs_digest(section, source, collection)
        and last.outputs == outputs_digest()
    )
    return Comparison(unchanged, folder, source, collection)


def log_unchanged(checked: Comparison, started: float) -> None:
    """sync's line for a run that found nothing to do (`started`: perf_counter then)."""
    get_logger("sync").info(
        "%d source files, the collection, the params and the outputs are as the last run "
        "left them: nothing to do; %.1f s",
        len(checked.source.files) if checked.source is not None else 0,
        time.perf_counter() - started,
    )
