"""Remote sources for sync: objects under an S3 prefix, or a list of HTTP(S) image URLs.

Not a stage: sync imports it. Listing says what a source offers (path in the collection,
size and ETag where known); fetching brings one object's bytes, retried with back-off.
Credentials for S3 come from the environment or the AWS config files, as boto3 finds
them (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/credentials), never from params.
"""

from __future__ import annotations

import http.client
import os
import posixpath
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from stages import common, settings

S3_PREFIX = "s3://"
HTTP_PREFIXES = ("http://", "https://")
LIST_SUFFIXES = (".txt", ".list")  # a local file of URLs, one per line
USER_AGENT = "smart-iss-posts-sync"
T = TypeVar("T")


@dataclass(frozen=True)
class RemoteSettings:
    """How to talk to remote sources: sync's endpoint, timeout, retry and size params."""

    endpoint_url: str | None
    timeout: float  # seconds to connect, and to wait for each read
    retries: int  # further tries after a failed one
    retry_wait: float  # seconds before the first retry; doubled before each next one
    max_bytes: int  # larger objects are refused without being downloaded


@dataclass(frozen=True)
class RemoteObject:
    """One object a remote source offers."""

    url: str  # s3://bucket/key or the http(s) URL
    relative_path: str  # where it lands in the collection
    size: int | None  # None where the listing does not tell (HTTP)
    etag: str | None  # None where the listing does not tell (HTTP)
    settings: RemoteSettings


@dataclass(frozen=True)
class Fetched:
    """An object's bytes, or None when the server says the copy we have is current."""

    data: bytes | None
    etag: str | None


class FetchError(Exception):
    """A fetch that failed for good (after retries, or at once when retrying cannot help)."""


class TooLargeError(FetchError):
    """An object over max_bytes: refused, not downloaded. Its ETag lets the next run ask
    the server whether it changed instead of starting the download again."""

    def __init__(self, message: str, etag: str | None) -> None:
        super().__init__(message)
        self.etag = etag


class RetryableError(Exception):
    """A failure that another try may not have: a dropped connection, a timeout, a 5xx."""


def is_remote(source: str) -> bool:
    """Whether a sync.source names a remote source rather than a folder."""
    return source.startswith((S3_PREFIX, *HTTP_PREFIXES)) or (
        source.endswith(LIST_SUFFIXES) and Path(source).expanduser().is_file()
    )


def safe_relative_path(name: str) -> str | None:
    """A clean POSIX path inside the collection, or None when `name` would land outside it
    (absolute, '..', a backslash, a control character) or names no file."""
    if not name or name.startswith("/") or "\\" in name or any(ord(c) < 32 for c in name):
        return None
    if any(part in ("..", ".") for part in name.split("/")) or name.endswith("/"):
        return None
    return posixpath.normpath(name)  # with no '..' or '.' left, this only folds 'a//b'


def with_retries(action: Callable[[], T], settings: RemoteSettings, what: str) -> T:
    """Run `action`, retrying RetryableErrors with exponential back-off, then give up with
    a FetchError naming `what` and the last error."""
    wait = settings.retry_wait
    for attempt in range(settings.retries + 1):
        try:
            return action()
        except RetryableError as error:
            if attempt == settings.retries:
                tries = settings.retries + 1
                raise FetchError(f"{what}: failed {tries} time(s), last: {error}") from None
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- S3


def parse_s3_url(source: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix; the prefix ends with '/' unless empty."""
    bucket, _, prefix = source[len(S3_PREFIX) :].partition("/")
    if not bucket:
        raise settings.param_error(
            "sync.source", source, "expected s3://bucket or s3://bucket/prefix"
        )
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


_clients: dict[tuple[int, str | None, float], Any] = {}


def s3_client(settings: RemoteSettings) -> Any:
    """A boto3 S3 client for this process (one per process: clients do not survive fork).

    botocore's own retries are off: with_retries does them, the same way for S3 and HTTP.
    """
    key = (os.getpid(), settings.endpoint_url, settings.timeout)
    if key not in _clients:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=settings.timeout,
            read_timeout=settings.timeout,
            retries={"max_attempts": 1, "mode": "standard"},
            user_agent_extra=USER_AGENT,
        )
        _clients[key] = boto3.session.Session().client(
            "s3", endpoint_url=settings.endpoint_url, config=config
        )
    return _clients[key]


def s3_error_code(error: Exception) -> str:
    """The S3 error code of a botocore ClientError ('' for other errors)."""
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def describe_s3_failure(error: Exception, source: str, settings: RemoteSettings) -> str:
    """One line saying why listing an S3 source failed, and what to check."""
    from botocore.exceptions import (
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    where = settings.endpoint_url or "AWS S3"
    code = s3_error_code(error)
    if isinstance(error, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        return (
            f"sync.source: cannot reach {where} for {source} ({error}); check "
            "sync.s3_endpoint_url and that the server is up"
        )
    if isinstance(error, NoCredentialsError):
        return (
            f"sync.source: no credentials for {source}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, in the environment"
        )
    if code == "NoSuchBucket":
        return f"sync.source: bucket {parse_s3_url(source)[0]} does not exist at {where}"
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"sync.source: {where} refused to list {source} ({code}): check the credentials"
    return f"sync.source: listing {source} at {where} failed: {error}"


def list_s3(
    source: str, settings: RemoteSettings
) -> tuple[list[RemoteObject], list[tuple[str, str]], int]:
    """The objects under an S3 prefix, sorted by key; the keys refused, with reasons; and
    how many hidden objects (a name starting with '.') were skipped.

    A key that would land outside the collection, or an object over max_bytes, is refused
    and never downloaded. Folder markers (keys ending in '/') are not objects.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_url(source)
    client = s3_client(settings)
    objects: list[RemoteObject] = []
    refused: list[tuple[str, str]] = []
    hidden = 0
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        listed = [item for page in pages for item in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as error:
        raise common.UserError(describe_s3_failure(error, source, settings)) from None
    for item in sorted(listed, key=lambda entry: entry["Key"]):
        key, size = item["Key"], int(item["Size"])
        if key.endswith("/") and size == 0:
            continue
        relative = safe_relative_path(key[len(prefix) :])
        if relative is None:
            refused.append((key, "refused: the key would land outside the collection"))
            continue
        if any(part.startswith(".") for part in relative.split("/")):
            hidden += 1
            continue
        if size > settings.max_bytes:
            refused.append((relative, f"{size} bytes, over sync.max_bytes ({settings.max_bytes})"))
            continue
        etag = str(item.get("ETag", "")).strip('"') or None
        url = f"{S3_PREFIX}{bucket}/{key}"
        objects.append(RemoteObject(url, relative, size, etag, settings))
    return objects, refused, hidden


def fetch_s3(item: RemoteObject) -> Fetched:
    """An S3 object's bytes, checked against the listed size, with retries."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = item.url[len(S3_PREFIX) :].partition("/")

    def attempt() -> Fetched:
        try:
            response = s3_client(item.settings).get_object(Bucket=bucket, Key=key)
            data = response["Body"].read()
        except ClientError as error:
            code = s3_error_code(error)
            if code in ("NoSuchKey", "AccessDenied", "InvalidObjectState"):
                raise FetchError(f"{item.url}: {code}") from None
            raise RetryableError(f"{code or error}") from None
        except (BotoCoreError, OSError, http.client.HTTPException) as error:
            raise RetryableError(f"{type(error).__name__}: {error}") from None
        if item.size is not None and len(data) != item.size:
            raise RetryableError(f"got {len(data)} of {item.size} bytes")
        return Fetched(data, str(response.get("ETag", "")).strip('"') or item.etag)

    return with_retries(attempt, item.settings, item.url)


# ----------------------------------------------------------------------------- HTTP


def read_url_list(source: str, settings: RemoteSettings) -> str:
    """The text of a URL list: fetched when `source` is a URL, else read from a file."""
    if not source.startswith(HTTP_PREFIXES):
        return Path(source).expanduser().read_text(encoding="utf-8-sig")
    listing = RemoteObject(source, "", None, None, settings)
    try:
        fetched = fetch_http(listing, known_etag=None)
    except FetchError as error:
        raise common.UserError(f"sync.source: cannot read the URL list {error}") from None
    assert fetched.data is not None
    return fetched.data.decode("utf-8-sig", errors="replace")


def path_of_url(url: str) -> str | None:
    """Where an image URL lands in the collection: host/path, or None when unsafe."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return safe_relative_path(f"{parts.hostname}{unquote(parts.path)}")


def list_http(
    source: str, settings: RemoteSettings
) -> tuple[list[RemoteObject], list[tuple[str, str]], int]:
    """The image URLs of a list (one per line; blank lines and # comments skipped), sorted by
    where they land; the lines refused, with reasons; and 0 hidden files."""
    objects: dict[str, RemoteObject] = {}
    refused: list[tuple[str, str]] = []
    for line in read_url_list(source, settings).splitlines():
        url = line.strip()
        if not url or url.startswith("#"):
            continue
        relative = path_of_url(url)
        if relative is None:
            refused.append((url, "refused: not an http(s) URL of a file inside the collection"))
        elif relative in objects:
            if objects[relative].url != url:
                refused.append((url, f"refused: lands on {relative} like an earlier URL"))
        else:
            objects[relative] = RemoteObject(url, relative, None, None, settings)
    return sorted(objects.values(), key=lambda item: item.relative_path), refused, 0


def fetch_http(item: RemoteObject, known_etag: str | None) -> Fetched:
    """A URL's bytes, or Fetched(None, etag) when the server says our copy (`known_etag`)
    is current (304). Refused over max_bytes; retried on timeouts, drops and 5xx."""
    settings = item.settings

    def attempt() -> Fetched:
        headers = {"User-Agent": USER_AGENT}
        if known_etag:
            headers["If-None-Match"] = f'"{known_etag}"'
        request = urllib.request.Request(item.url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=settings.timeout) as response:
                etag = (response.headers.get("ETag") or "").removeprefix("W/").strip('"') or None
                length = response.headers.get("Content-Length")
                limit = f"over sync.max_bytes ({settings.max_bytes})"
                if length is not None and int(length) > settings.max_bytes:
                    raise TooLargeError(f"{length} bytes, {limit}", etag)
                data = response.read(settings.max_bytes + 1)
                if len(data) > settings.max_bytes:
                    raise TooLargeError(limit, etag)
                if length is not None and len(data) != int(length):
                    raise RetryableError(f"got {len(data)} of {length} bytes")
                return Fetched(data, etag)
        except urllib.error.HTTPError as error:
            if error.code == 304:
                return Fetched(None, known_etag)
            if error.code >= 500 or error.code == 429:
                raise RetryableError(f"HTTP {error.code}") from None
            raise FetchError(f"{item.url}: HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, ConnectionRefusedError | socket.gaierror):
                raise FetchError(f"{item.url}: cannot connect ({reason})") from None
            raise RetryableError(str(reason)) from None
        except (http.client.HTTPException, OSError) as error:
            raise RetryableError(f"{type(error).__name__}: {error}") from None

    return with_retries(attempt, settings, item.url)


# ----------------------------------------------------------------------------- both


def list_remote(
    source: str, settings: RemoteSettings
) -> tuple[list[RemoteObject], list[tuple[str, str]], int]:
    """List an S3 prefix or a URL list (see list_s3 and list_http)."""
    if source.startswith(S3_PREFIX):
        return list_s3(source, settings)
    return list_http(source, settings)


def fetch(item: RemoteObject, known_etag: str | None) -> Fetched:
    """Fetch one listed object (see fetch_s3 and fetch_http)."""
    if item.url.startswith(S3_PREFIX):
        return fetch_s3(item)
    return fetch_http(item, known_etag)
