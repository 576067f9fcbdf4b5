"""sync's record of its last run over a local folder, so that a run in which nothing changed
costs one walk of the source and the collection, and writes nothing.

The record (data/cache/sync/last-run.json, outside DVC) holds two digests:
- inputs: sync's params, its code, the size and modification time of the history file
  and of every file of the source folder, and the file names and folder times of the
  collection after the run (sync writes there by renaming files into place, which
  changes a folder's time; a copy edited in place by hand is not noticed);
- outputs: the bytes of the manifest, the rejected list and the remote state it wrote.
A run whose inputs and current outputs both match has nothing to do: sync is
deterministic, so doing the work again would write the same bytes. Any difference (a new,
changed or removed file, an edited param, another checkout of the outputs) makes it do
the work.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stages import (
    common,
    image_health,
    images,
    remote,
    sync_files,
    sync_manifest,
    sync_remote_state,
    sync_sources,
)

LAST_RUN_FILE = common.CACHE_DIR / "sync" / "last-run.json"
# The modules whose code decides what sync writes (sync.py itself is passed in).
CODE_MODULES = (
    common,
    image_health,
    images,
    remote,
    sync_files,
    sync_manifest,
    sync_remote_state,
    sync_sources,
)


@dataclass(frozen=True)
class LastRun:
    """The digests of a sync run's inputs and outputs."""

    inputs: str
    outputs: str


def listing_text(listing: sync_sources.FolderListing) -> str:
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
    if history is None:
        return ""
    try:
        status = Path(history).expanduser().stat()
    except OSError:
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    return f"{status.st_size}\0{status.st_mtime_ns}"


def inputs_digest(
    params: dict[str, Any],
    code_files: list[Path],
    history: str,
    source: sync_sources.FolderListing,
    collection: sync_sources.FolderListing,
) -> str:
    """The digest of everything a local sync run reads (`history`: its history_stamp)."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for path in code_files:
        digest.update(f"\n{path.name}\n".encode())
        digest.update(path.read_bytes())
    digest.update(f"\nhistory\0{history}".encode())
    for listing in (source, collection):
        digest.update(b"\n--\n")
        digest.update(listing_text(listing).encode("utf-8", errors="surrogateescape"))
    return digest.hexdigest()


def outputs_digest(paths: list[Path]) -> str | None:
    """The digest of the output files' bytes; None when one is missing."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            digest.update(path.read_bytes())
        except FileNotFoundError:
            return None
        digest.update(b"\0")
    return digest.hexdigest()


def code_files(stage_module_file: str) -> list[Path]:
    """The source files of sync's code."""
    return [Path(stage_module_file), *(Path(str(module.__file__)) for module in CODE_MODULES)]


def read_last_run(path: Path = LAST_RUN_FILE) -> LastRun | None:
    """The record of the last run; None when there is none or it cannot be read."""
    try:
        values = json.loads(path.read_text())
        return LastRun(str(values["inputs"]), str(values["outputs"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_last_run(record: LastRun, path: Path = LAST_RUN_FILE) -> None:
    """Keep the record of this run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    common.write_bytes_atomic(json.dumps(asdict(record)).encode(), path)
