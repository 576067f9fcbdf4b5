"""sync's sources: what a folder, the built-in demo, or an S3 or URL-list source offers.

Each source gives a sorted list of `SourceFile`s: where a file lands in the collection and
how to get its bytes. Reading bytes of remote objects is in `stages.remote`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages import common, remote, settings
from stages.folder_walk import FolderListing, collection_listing, list_folder

BUILTIN_DIGITS = "builtin:digits"


# Not frozen: a frozen dataclass sets each field through object.__setattr__, three times
# as slow, and a folder of 100,000 files makes 100,000 of these on every run.
@dataclass(slots=True)
class SourceFile:
    """One file a source offers: where it lands in the collection and how to get its bytes."""

    relative_path: str  # POSIX path inside the collection
    size: int
    mtime_ns: int | None = None  # None for generated files, which have no time
    local_path: str | None = None  # set for files of a folder source
    content: bytes | None = None  # set for generated files (the built-in demo)
    label: str | None = None  # ground truth the source itself knows
    remote: remote.RemoteObject | None = None  # set for files of an S3 or URL-list source
    known: dict[str, Any] | None = (
        None  # remote: what the last run saw (see sync_remote_state.COLUMNS)
    )


def read_source_bytes(item: SourceFile) -> bytes:
    """The bytes of a local or generated source file."""
    if item.content is not None:
        return item.content
    assert item.local_path is not None
    return Path(item.local_path).read_bytes()


def is_unchanged(item: SourceFile, destination: str | Path) -> bool:
    """True when the collection already holds this source file as it is now.

    Folder files compare size and modification time, as rsync does; generated files
    compare bytes.
    """
    try:
        status = os.stat(destination)  # noqa: PTH116 (a string path: see list_folder)
    except FileNotFoundError:
        return False
    if status.st_size != item.size:
        return False
    if item.content is not None:
        return Path(destination).read_bytes() == item.content
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


def folder_source_files(
    folder: Path, listing: FolderListing | None = None
) -> tuple[list[SourceFile], int, list[tuple[str, str]]]:
    """Every regular file under `folder` as a SourceFile, sorted by path; how many hidden
    ones were skipped; and (shown path, reason) of the files refused for their name (see
    list_folder, whose `listing` is used when given)."""
    listing = list_folder(folder) if listing is None else listing
    # Strings, not Paths: pathlib's parsing costs seconds at 100,000 files.
    root = os.fspath(folder)
    files = [
        SourceFile(relative, size, mtime_ns, local_path=f"{root}/{relative}")
        for relative, size, mtime_ns in listing.files
    ]
    return files, listing.hidden, listing.refused


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


def source_folder(source: str, collection: Path) -> Path | None:
    """The folder of a local source, checked; None for the built-in demo.

    Raises a UserError naming the source when it is no folder, or overlaps the collection.
    """
    if source == BUILTIN_DIGITS:
        return None
    if source.startswith("builtin:"):
        raise settings.param_error(
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
    return folder


def list_source(
    source: str, collection: Path, listing: FolderListing | None = None
) -> tuple[list[SourceFile], int, list[tuple[str, str]]]:
    """The files a local or built-in source offers, the count of hidden files skipped, and
    (name, reason) of the files refused for their name.

    Raises a UserError naming the source when it cannot be read. `listing` is the
    folder's, when the caller has walked it already.
    """
    folder = source_folder(source, collection)
    if folder is None:
        return digits_source_files(), 0, []
    return folder_source_files(folder, listing)


def collection_files(collection: Path, listing: FolderListing | None = None) -> list[str]:
    """Relative POSIX paths of the files in the collection, hidden ones left out (from
    `listing`, its walk, when the caller has made it)."""
    listing = collection_listing(collection) if listing is None else listing
    return [relative for relative, _, _ in listing.files]
