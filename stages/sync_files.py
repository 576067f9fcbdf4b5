"""sync's files: measuring an image (decoded, its size, its health scores, EXIF time) and
copying it into the collection under a temporary name, renamed into place once whole.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from PIL import Image

from stages import image_health, images, remote
from stages.sync_sources import SourceFile, is_unchanged, read_source_bytes

EXIF_IFD_TAG = 0x8769
EXIF_DATETIME_ORIGINAL_TAG = 36867
TEMPORARY_PREFIX = ".sync-tmp-"  # a copy in progress: hidden, and of a fixed, short length


@dataclass(frozen=True)
class Measurement:
    """What decoding one image file tells."""

    sha256: str
    bytes: int
    width: int  # upright, after the EXIF orientation
    height: int
    health: image_health.HealthScores  # pixel measurements: hashes, quality scores
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
            width, height = images.upright_size(image)
            exif_taken_at = read_exif_taken_at(image)
            image.draft(None, image_health.measure_request(*image.size))
            image.load()
            small = images.to_rgb(images.upright(image))
            small.thumbnail(
                (image_health.MEASURE_SIZE, image_health.MEASURE_SIZE), Image.Resampling.BOX
            )
            health = image_health.health_scores(small)
    except Image.UnidentifiedImageError:
        return "not an image (format not recognized)"
    except Exception as error:  # any decoder failure means the file is unusable
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"cannot decode: {message}"
    return Measurement(
        sha256=images.sha256_hex(data),
        bytes=len(data),
        width=width,
        height=height,
        health=health,
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
    temporary = destination.with_name(temporary_name(destination.name))
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(data)
        if item.mtime_ns is not None:
            os.utime(temporary, ns=(item.mtime_ns, item.mtime_ns))
        os.replace(temporary, destination)
    except OSError as error:  # a name this file system refuses, a full disk...
        reason = f"cannot store in the collection: {error.strerror or error}"
        return FileOutcome(item.relative_path, None, reason, label=item.label)
    finally:
        temporary.unlink(missing_ok=True)
    return FileOutcome(item.relative_path, result, copied=True, label=item.label)


def temporary_name(name: str) -> str:
    """The name a file is copied under before it is renamed into place.

    Of a fixed length (27 characters), so that a name as long as the file system allows
    still has a temporary one; derived from the name, so that two copies never share it.
    """
    return TEMPORARY_PREFIX + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


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


@dataclass(frozen=True)
class BringTask:
    """Measure a source file and copy it in when it is new or changed."""

    item: SourceFile
    collection: Path
    max_pixels: int

    def run(self) -> FileOutcome:
        """Do it; never raises for a bad file."""
        return bring_source_file(self.item, self.collection, self.max_pixels)


@dataclass(frozen=True)
class MeasureTask:
    """Measure a file already in the collection (one the source no longer offers)."""

    relative_path: str
    collection: Path
    max_pixels: int

    def run(self) -> FileOutcome:
        """Do it; never raises for a bad file."""
        return measure_collection_file(self.relative_path, self.collection, self.max_pixels)


def run_task(task: BringTask | MeasureTask) -> FileOutcome:
    """Pool entry point."""
    return task.run()


def remove_temporary_files(collection: Path) -> None:
    """Delete the temporary files that a killed run left behind."""
    for temporary in collection.rglob(f"{TEMPORARY_PREFIX}*"):
        temporary.unlink(missing_ok=True)
