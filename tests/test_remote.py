"""Remote sources: sync from S3 (moto's real S3-speaking server on 127.0.0.1) and from a
list of HTTP URLs (a local HTTP server), and a DVC S3 remote that push and pull go through."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import itertools
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from conftest import (
    clean_copy,
    dvc,
    good_image_files,
    image_bytes,
    is_up_to_date,
    pattern_image,
    stages_run,
)

from stages import common, remote, sync_work

BUCKET = "frames-bucket"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def aws_environment() -> Iterator[None]:
    """Test credentials in the environment (where boto3 and dvc look), nothing from ~/.aws."""
    saved = dict(os.environ)
    os.environ.update(CREDENTIALS)
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"
    os.environ["AWS_CONFIG_FILE"] = "/nonexistent"
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def moto_endpoint(aws_environment: None) -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class Proxy:
    """An HTTP proxy in front of a server that records each request and can cut a
    response short: for paths in `cut`, it promises the whole body and sends half."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.requests: list[tuple[str, str]] = []
        self.cut: set[str] = set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.requests.append((self.command, self.path))
                connection = http.client.HTTPConnection(proxy.upstream, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                cut = self.command == "GET" and any(self.path.startswith(p) for p in proxy.cut)
                if cut:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data[: len(data) // 2] if cut else data)
                if cut:
                    self.close_connection = True
                connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def object_gets(self) -> list[str]:
        """Paths of GET requests for objects (not listings)."""
        return [
            path for method, path in self.requests if method == "GET" and "list-type" not in path
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[Proxy]:
    instance = Proxy(moto_endpoint)
    yield instance
    instance.close()


@pytest.fixture
def bucket(moto_endpoint: str) -> Iterator[Any]:
    """An empty bucket; its client uploads the test's objects."""
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def sync_params(
    params: dict[str, Any], source: str, endpoint: str | None, **changes: Any
) -> sync_work.SyncParams:
    params["sync"].update(
        {"source": source, "s3_endpoint_url": endpoint, "retries": 2, "retry_wait": 0.01}
    )
    params["sync"]["timeout"] = 5
    params["sync"].update(changes)
    return sync_work.SyncParams.from_params(params)


def run(settings: sync_work.SyncParams, collection: Path, last: sync_work.SyncResult | None = None):
    return sync_work.sync_collection(
        settings,
        collection,
        last.manifest if last else None,
        workers=1,
        previous_remote=last.remote_state if last else None,
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/b.jpg", "a/b.jpg"),
        ("20170512-103200.jpg", "20170512-103200.jpg"),
        ("../escape.jpg", None),
        ("a/../../escape.jpg", None),
        ("a/./b.jpg", None),
        ("/etc/passwd", None),
        ("a\\..\\b.jpg", None),
        ("a//b.jpg", "a/b.jpg"),
        ("folder/", None),
        ("", None),
        ("bad\nname.jpg", None),
    ],
)
def test_keys_that_would_leave_the_collection_are_refused(name: str, expected: str | None) -> None:
    assert remote.safe_relative_path(name) == expected


def test_retries_back_off_then_give_up_with_the_last_error() -> None:
    settings = remote.RemoteSettings(None, timeout=1, retries=3, retry_wait=0.01, max_bytes=10)
    calls: list[float] = []

    def failing() -> None:
        calls.append(time.perf_counter())
        raise remote.RetryableError("connection reset")

    with pytest.raises(remote.FetchError, match=r"thing: failed 4 time.*connection reset"):
        remote.with_retries(failing, settings, "thing")
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert len(calls) == 4 and gaps[2] > gaps[0] * 1.5  # waits double


# ----------------------------------------------------------------------------- S3


def upload(client: Any, files: dict[str, bytes], prefix: str = "frames/") -> None:
    for name, data in files.items():
        client.put_object(Bucket=BUCKET, Key=prefix + name, Body=data)


def test_sync_from_s3_brings_good_images_and_refuses_the_rest(
    bucket: Any, proxy: Proxy, params: dict[str, Any], tmp_path: Path
) -> None:
    good = good_image_files()
    upload(bucket, good)
    upload(bucket, {"broken.jpg": b"\xff\xd8\xff not really", "notes.txt": b"hello"})
    upload(bucket, {"big.png": image_bytes(pattern_image(400, 400), "PNG")})
    upload(bucket, {"../outside.jpg": good["gray.png"], "a/../../up.jpg": good["gray.png"]})
    upload(bucket, {".hidden.jpg": good["gray.png"], "elsewhere.jpg": good["gray.png"]}, "other/")
    big = len(image_bytes(pattern_image(400, 400), "PNG"))
    settings = sync_params(params, f"s3://{BUCKET}/frames", proxy.url, max_bytes=big - 1)
    collection = tmp_path / "project/data/raw/collections"
    result = run(settings, collection)

    assert sorted(result.manifest["path"]) == sorted(good)
    assert tree(collection) == good
    assert (
        not list((tmp_path / "project").rglob("*outside*")) and not (tmp_path / "up.jpg").exists()
    )
    reasons = dict(zip(result.rejected["path"], result.rejected["reason"]))
    assert reasons["frames/../outside.jpg"].startswith("refused: the key would land outside")
    assert reasons["frames/a/../../up.jpg"].startswith("refused: the key would land outside")
    assert "over sync.max_bytes" in reasons["big.png"]
    assert "broken.jpg" in reasons and "notes.txt" in reasons
    assert not any(path.endswith("big.png") for path in proxy.object_gets()), "never downloaded"
    state = result.remote_state.set_index("path")
    assert state.loc["gray.png", "url"] == f"s3://{BUCKET}/frames/gray.png"
    assert state.loc["gray.png", "etag"] == hashlib.md5(good["gray.png"]).hexdigest()


def test_a_second_s3_sync_downloads_only_new_or_changed_objects(
    bucket: Any, proxy: Proxy, params: dict[str, Any], tmp_path: Path
) -> None:
    good = good_image_files()
    upload(bucket, good)
    upload(bucket, {"broken.jpg": b"\xff\xd8\xff not really"})
    settings = sync_params(params, f"s3://{BUCKET}/frames", proxy.url)
    collection = tmp_path / "collections"
    first = run(settings, collection)
    assert len(proxy.object_gets()) == len(good) + 1

    proxy.requests.clear()
    second = run(settings, collection, first)
    assert proxy.object_gets() == [], "nothing changed: nothing downloaded, not even the bad file"
    assert second.manifest.equals(first.manifest)
    assert second.rejected.equals(first.rejected)

    changed = image_bytes(pattern_image(70, 50, seed=9), "PNG")
    upload(bucket, {"gray.png": changed, "new/one.png": image_bytes(pattern_image(30, 30), "PNG")})
    proxy.requests.clear()
    third = run(settings, collection, second)
    assert sorted(proxy.object_gets()) == [
        f"/{BUCKET}/frames/gray.png",
        f"/{BUCKET}/frames/new/one.png",
    ]
    assert (collection / "gray.png").read_bytes() == changed
    assert third.summary.copied == 2 and len(third.manifest) == len(good) + 1


def test_an_object_that_fails_halfway_is_retried_reported_and_leaves_no_file(
    bucket: Any, proxy: Proxy, params: dict[str, Any], tmp_path: Path
) -> None:
    good = good_image_files()
    upload(bucket, good)
    proxy.cut.add(f"/{BUCKET}/frames/cmyk.jpg")
    settings = sync_params(params, f"s3://{BUCKET}/frames", proxy.url)
    collection = tmp_path / "collections"
    result = run(settings, collection)

    reasons = dict(zip(result.rejected["path"], result.rejected["reason"]))
    assert reasons["cmyk.jpg"].startswith("download failed")
    assert "failed 3 time(s)" in reasons["cmyk.jpg"]
    assert proxy.object_gets().count(f"/{BUCKET}/frames/cmyk.jpg") == 3  # 1 try + 2 retries
    assert sorted(tree(collection)) == sorted(set(good) - {"cmyk.jpg"}), "no partial file"
    assert len(result.manifest) == len(good) - 1

    proxy.cut.clear()  # the network is back: the failed object is fetched on the next run
    proxy.requests.clear()
    again = run(settings, collection, result)
    assert proxy.object_gets() == [f"/{BUCKET}/frames/cmyk.jpg"]
    assert len(again.manifest) == len(good) and again.rejected.empty


def test_a_server_that_is_down_gives_a_clear_error_fast(
    params: dict[str, Any], tmp_path: Path, aws_environment: None
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    settings = sync_params(params, f"s3://{BUCKET}/frames", endpoint)
    started = time.perf_counter()
    with pytest.raises(common.UserError, match=f"cannot reach {endpoint} for s3://{BUCKET}"):
        run(settings, tmp_path / "collections")
    assert time.perf_counter() - started < 15
    assert not (tmp_path / "collections").exists()


def test_a_missing_bucket_and_missing_credentials_are_named(
    moto_endpoint: str, params: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = sync_params(params, "s3://no-such-bucket/x", moto_endpoint)
    with pytest.raises(common.UserError, match="bucket no-such-bucket does not exist"):
        run(settings, tmp_path / "collections")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    remote._clients.clear()
    with pytest.raises(common.UserError, match="no credentials for s3://no-such-bucket/x"):
        run(settings, tmp_path / "collections")
    remote._clients.clear()


# ----------------------------------------------------------------------------- HTTP


class ImageServer:
    """A small HTTP server of image files with ETags; paths under /cut/ send half their
    body, paths under /flaky/ answer 503 to the first two tries."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, int]] = []
        self.flaky_tries: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                for special in ("cut/", "flaky/"):
                    name = name.removeprefix(special)
                data = server.files.get(name)
                status = 200 if data is not None else 404
                if self.path.startswith("/flaky/"):
                    tries = server.flaky_tries[self.path] = server.flaky_tries.get(self.path, 0) + 1
                    status = 503 if tries <= 2 else status
                etag = f'"{hashlib.sha1(data).hexdigest()}"' if data is not None else None
                if status == 200 and self.headers.get("If-None-Match") == etag:
                    status = 304
                server.requests.append((self.path, status))
                self.send_response(status)
                if etag:
                    self.send_header("ETag", etag)
                body = data if status == 200 else b""
                self.send_header("Content-Length", str(len(body)))
                if self.path.startswith("/cut/"):
                    self.send_header("Connection", "close")
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies_sent(self) -> list[str]:
        return [path for path, status in self.requests if status == 200]


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    good = good_image_files()
    files = {name: good[name] for name in ("gray.png", "palette.png", "20170512-103200.jpg")}
    files["big.png"] = image_bytes(pattern_image(400, 400), "PNG")
    files["list.txt"] = b""
    server = ImageServer(files)
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_sync_from_a_url_list_is_incremental_and_reports_every_failure(
    image_server: ImageServer, params: dict[str, Any], tmp_path: Path
) -> None:
    base = image_server.url
    urls = [
        f"{base}/gray.png",
        f"{base}/palette.png",
        f"{base}/flaky/20170512-103200.jpg",  # 503 twice, then served: retried
        f"{base}/cut/gray.png",  # always cut halfway
        f"{base}/missing.png",  # 404: not retried
        f"{base}/big.png",
        "ftp://example.com/x.jpg",
        "# a comment",
        "",
    ]
    list_file = tmp_path / "urls.txt"
    list_file.write_text("\n".join(urls) + "\n")
    big = len(image_server.files["big.png"])
    settings = sync_params(params, str(list_file), None, max_bytes=big - 1)
    collection = tmp_path / "collections"
    first = run(settings, collection)

    host = "127.0.0.1"
    assert sorted(first.manifest["path"]) == [
        f"{host}/flaky/20170512-103200.jpg",
        f"{host}/gray.png",
        f"{host}/palette.png",
    ]
    reasons = dict(zip(first.rejected["path"], first.rejected["reason"]))
    assert reasons[f"{host}/cut/gray.png"].startswith("download failed")
    assert "HTTP 404" in reasons[f"{host}/missing.png"]
    assert "over sync.max_bytes" in reasons[f"{host}/big.png"]
    assert reasons["ftp://example.com/x.jpg"].startswith("refused")
    assert image_server.flaky_tries["/flaky/20170512-103200.jpg"] == 3
    assert not list(collection.rglob("*.sync-tmp")) and not (collection / host / "cut").exists()

    image_server.requests.clear()
    second = run(settings, collection, first)
    assert image_server.bodies_sent() == ["/cut/gray.png"] * 3, "the rest answered 304"
    assert second.manifest.equals(first.manifest)


def test_a_url_list_on_a_server_that_is_down_gives_a_clear_error(
    params: dict[str, Any], tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}/list.txt"
    settings = sync_params(params, url, None)
    started = time.perf_counter()
    with pytest.raises(common.UserError, match=f"cannot read the URL list {url}"):
        run(settings, tmp_path / "collections")
    assert time.perf_counter() - started < 10


# ----------------------------------------------------------------------------- DVC remote

FIRST_STAGES = ("sync", "prepare", "duplicates", "split")


def stage_outputs(project: Path) -> dict[str, bytes]:
    """Every file the first stages wrote, by path."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    files: dict[str, bytes] = {}
    for stage in FIRST_STAGES:
        for out in lock["stages"][stage]["outs"]:
            path = project / out["path"]
            paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            files.update({p.relative_to(project).as_posix(): p.read_bytes() for p in paths})
    return files


def test_dvc_push_and_pull_through_an_s3_remote(
    moto_endpoint: str, bucket: Any, tmp_path: Path
) -> None:
    good = good_image_files()
    upload(bucket, good)
    upload(bucket, {"broken.jpg": b"\xff\xd8\xff not really", "../escape.jpg": good["gray.png"]})
    project = clean_copy(tmp_path / "project")
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["sync"].update(source=f"s3://{BUCKET}/frames", s3_endpoint_url=moto_endpoint)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    printed = dvc(["repro", *FIRST_STAGES], project)
    assert f"{len(good)} images from {len(good) + 2} source files" in printed
    rejected = (project / "data/raw/rejected.csv").read_text()
    assert "broken.jpg" in rejected and "frames/../escape.jpg" in rejected

    dvc(["remote", "add", "-d", "storage", f"s3://{BUCKET}/dvcstore"], project)
    dvc(["remote", "modify", "storage", "endpointurl", moto_endpoint], project)
    before = stage_outputs(project)
    assert "data/interim/pixels/part-00000.npy" in before
    # The images stay in their source: the manifest pins them, DVC neither hashes nor
    # stores them.
    assert not any(path.startswith("data/raw/collections") for path in before)
    collection = project / "data/raw/collections"
    originals = {path.name: path.read_bytes() for path in collection.rglob("*") if path.is_file()}
    assert len(originals) == len(good)
    printed = dvc(["push", *FIRST_STAGES], project)
    assert "pushed" in printed
    stored = bucket.list_objects_v2(Bucket=BUCKET, Prefix="dvcstore/")["KeyCount"]
    assert stored > 0

    shutil.rmtree(project / ".dvc/cache")
    for path in ("data/raw", "data/interim", "data/processed/split.parquet"):
        target = project / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert not (project / "data/interim/pixels").exists()
    dvc(["pull", *FIRST_STAGES], project)
    after = stage_outputs(project)
    assert after.keys() == before.keys()
    assert all(after[path] == before[path] for path in before), "every file byte-identical"
    # A clone that pulled runs sync, which brings the images back from the source with
    # the same manifest, so nothing after it runs again.
    printed = dvc(["repro", *FIRST_STAGES], project)
    assert f"{len(good)} copied" in printed
    assert stages_run(printed) == ["sync"]
    restored = {path.name: path.read_bytes() for path in collection.rglob("*") if path.is_file()}
    assert restored == originals
    assert stage_outputs(project) == before
    assert is_up_to_date(project, *FIRST_STAGES)
