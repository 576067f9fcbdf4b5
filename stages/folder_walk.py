"""A walk of a folder: its files with their sizes and times, as sync lists a source folder
and its collection. Only the standard library: sync's check that nothing changed runs this
before Python loads pandas (see sync_last_run).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path


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
                # isascii first: one C call settles nearly every name.
                if not relative.isascii() and not is_utf8(relative):
                    refused.append((shown_path(relative), "the file name is not valid UTF-8"))
                    continue
                files.append((relative, size, mtime_ns))
    files.sort()
    refused.sort()
    folders.sort()
    return FolderListing(files, hidden, refused, folders)


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


def collection_listing(collection: Path) -> FolderListing:
    """The walk of the collection without measuring its files (see list_folder): sync
    writes every file there by renaming it into place, which changes its folder's time.
    Empty when there is no collection yet."""
    if not collection.is_dir():
        return FolderListing([], 0, [])
    return list_folder(collection, measure=False)
