"""sync's sources: what a folder, the built-in demo, or an S3 or URL-list source offers.

Each source gives a sorted list of `SourceFile`s: where a file lands in the collection and
how to get its bytes. Reading bytes of remote objects is in `stages.remote`.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages import common, remote, settings

BUILTIN_DIGITS = "builtin:digits"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class FolderListing:
    """What a walk of a folder finds: its regular files as (POSIX path inside the folder,
    size, modification time in ns), sorted by path; how many hidden files and folders it
    skipped; (shown path, reason) of the files refused for their name; and, for a walk
    that does not measure files, (POSIX path, modification time in ns) of each folder."""

    files: list[tuple[str, int, int]]
    hidden: int
    refused: list[tuple[str, str]]
    folders: list[tuple[str, int]] = field(default_factory=list)


def list_folder(folder: Path, measure: bool = True) -> FolderListing:
    """Walk `folder` (see FolderListing) with os.scandir, one stat call a file.

    Hidden files and folders (.DS_Store, .git) are skipped; symbolic links are not followed
    into folders. A path that is not valid UTF-8 is refused: tables and pages could not
    hold it. It is shown with its odd bytes written as \\xNN.

    With `measure` False no file is stat'ed: sizes and times are -1, and each folder's
    time is kept instead, which changes whenever a file in it is added, removed or
    renamed over (at 100,000 files this saves two thirds of the walk).
    """
    files: list[tuple[str, int, int]] = []
    refused: list[tuple[str, str]] = []
    folders: list[tuple[str, int]] = []
    hidden = 0
    root = os.fspath(folder)
    if not measure:
        folders.append(("", os.stat(root).st_mtime_ns))  # noqa: PTH116 (see below)
    pending = [("", root)]
    while pending:
        prefix, directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    hidden += 1
                    continue
                relative = prefix + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((relative + "/", entry.path))
                        if not measure:
                            folders.append((relative, entry.stat().st_mtime_ns))
                        continue
                    if measure:
                        status = entry.stat()  # follows a link to a file
                        if not stat.S_ISREG(status.st_mode):
                            continue
                        size, mtime_ns = status.st_size, status.st_mtime_ns
                    elif entry.is_file():
                        size = mtime_ns = -1
                    else:
                        continue
                except OSError:
                    continue  # a dangling link: nothing to read
                if not is_utf8(relative):
                    refused.append((shown_path(relative), "the file name is not valid UTF-8"))
                    continue
                files.append((relative, size, mtime_ns))
    files.sort()
    refused.sort()
    folders.sort()
    return FolderListing(files, hidden, refused, folders)


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
        SourceFile(relative, size, mtime_ns, local_path=os.path.join(root, relative))  # noqa: PTH118
        for relative, size, mtime_ns in listing.files
    ]
    return files, listing.hidden, listing.refused


def is_utf8(name: str) -> bool:
    """Whether a name read from the file system is valid UTF-8 (Python keeps other bytes
    as lone surrogates, which no table or page can hold)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_path(name: str) -> str:
    """A file system name as text: valid UTF-8 as it is, other bytes as \\xNN."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


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


def collection_listing(collection: Path) -> FolderListing:
    """The walk of the collection without measuring its files (see list_folder): sync
    writes every file there by renaming it into place, which changes its folder's time.
    Empty when there is no collection yet."""
    if not collection.is_dir():
        return FolderListing([], 0, [])
    return list_folder(collection, measure=False)


def collection_files(collection: Path, listing: FolderListing | None = None) -> list[str]:
    """Relative POSIX paths of the files in the collection, hidden ones left out (from
    `listing`, its walk, when the caller has made it)."""
    listing = collection_listing(collection) if listing is None else listing
    return [relative for relative, _, _ in listing.files]
