"""sync's work, when its check finds something changed (see stages/sync.py, the stage).

Every file is decoded before it is accepted; a bad file goes to rejected.csv with its
reason and the rest goes on. A second run copies only new or changed files, and the
source is only ever read. The work is in three modules: sync_sources (what a source
offers), sync_files (measuring and copying) and sync_manifest (history and manifest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pandas as pd
from pydantic import Field, field_validator

from stages import (
    common,
    compute,
    image_health,
    remote,
    settings,
    sync_last_run,
    sync_remote_state,
)
from stages.sync_files import BringTask, FileOutcome, MeasureTask, remove_temporary_files, run_task
from stages.sync_manifest import (
    Description,
    HistoryReport,
    build_manifest,
    measured_table,
    read_history,
    reusable_manifest,
    reusable_rows,
    reused_table,
)
from stages.sync_sources import (
    BUILTIN_DIGITS,
    FolderListing,
    collection_files,
    collection_listing,
    is_unchanged,
    list_source,
    remote_source_files,
    source_folder,
)

STAGE = "sync"
REMOTE_WORKERS = 8  # downloads wait on the network: more of them than cores
SOURCE_WORDS = f"expected a folder, s3://bucket/prefix, a URL list or {BUILTIN_DIGITS}"
PATTERN_WORDS = "expected a strptime pattern such as %Y%m%d-%H%M%S"
ENDPOINT_WORDS = "expected http(s)://host:port, or null for AWS"


class SyncParams(settings.Section):
    """params.yaml, section sync."""

    SECTION: ClassVar[str] = "sync"
    source: str = Field(
        BUILTIN_DIGITS,
        description="a folder (searched recursively), s3://bucket/prefix, a list of image "
        f"URLs (https://.../list.txt or a local .txt), or {BUILTIN_DIGITS} (the demo)",
        json_schema_extra={"allowed": SOURCE_WORDS},
    )
    history: str | None = Field(
        None, description="optional locations file of `lat;lon;id;place` lines, joined on id"
    )
    taken_at_pattern: str | None = Field(
        "%Y%m%d-%H%M%S",
        description="strptime pattern matched against file names (ISS: 20170512-103200.jpg)",
        json_schema_extra={"allowed": PATTERN_WORDS},
    )
    label_from: Literal["none", "folder"] = Field(
        "none", description="folder: the top-level sub-folder names the label"
    )
    max_pixels: int = Field(
        100_000_000, ge=1, description="larger images are rejected (decompression bombs)"
    )
    blank_max_std: float = Field(
        2.0,
        ge=0,
        allow_inf_nan=False,
        description="a frame whose gray levels (0-255) vary less is flagged blank",
    )
    mirror: bool = Field(False, description="also delete collection files the source lost")
    s3_endpoint_url: str | None = Field(
        None,
        description="an S3-compatible server (http://127.0.0.1:9000), null for AWS; "
        "credentials come from the environment or ~/.aws, never from here",
        json_schema_extra={"allowed": ENDPOINT_WORDS},
    )
    timeout: float = Field(
        30,
        ge=0.001,
        allow_inf_nan=False,
        description="seconds to connect to a remote source and to wait for each read",
    )
    retries: int = Field(3, ge=0, description="further tries of a failed download, with back-off")
    retry_wait: float = Field(
        1.0,
        ge=0,
        allow_inf_nan=False,
        description="seconds before the first retry, doubled before each next one",
    )
    max_bytes: int = Field(
        104_857_600, ge=1, description="larger files are refused (remote ones never downloaded)"
    )

    @field_validator("source")
    @classmethod
    def source_given(cls, value: str) -> str:
        """An empty source is no source."""
        if not value.strip():
            raise ValueError(SOURCE_WORDS)
        return value

    @field_validator("history", "taken_at_pattern", "s3_endpoint_url", mode="before")
    @classmethod
    def empty_is_null(cls, value: Any) -> Any:
        """An empty text means: not set."""
        return None if value == "" else value

    @field_validator("taken_at_pattern")
    @classmethod
    def strptime_pattern(cls, value: str | None) -> str | None:
        """A pattern without a % directive would never match a time."""
        if value is not None and "%" not in value:
            raise ValueError(PATTERN_WORDS)
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def endpoint_url(cls, value: str | None) -> str | None:
        """An endpoint is an HTTP(S) URL."""
        if value is not None and not value.startswith(remote.HTTP_PREFIXES):
            raise ValueError(ENDPOINT_WORDS)
        return value

    @property
    def remote(self) -> remote.RemoteSettings:
        """How to talk to a remote source."""
        return remote.RemoteSettings(
            endpoint_url=self.s3_endpoint_url,
            timeout=self.timeout,
            retries=self.retries,
            retry_wait=self.retry_wait,
            max_bytes=self.max_bytes,
        )

    @property
    def description(self) -> Description:
        """How images are described in the manifest."""
        return Description(self.taken_at_pattern, self.label_from, self.blank_max_std)


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
    remote_state: pd.DataFrame  # sync_remote_state.COLUMNS; empty for local sources


def sync_collection(
    params: SyncParams,
    collection: Path,
    previous_manifest: pd.DataFrame | None,
    workers: int,
    previous_remote: pd.DataFrame | None = None,
    source_listing: FolderListing | None = None,
    collection_walk: FolderListing | None = None,
) -> SyncResult:
    """Bring the source into `collection`; return the manifest, the rejected table and counts.

    Files the source lost stay in the collection and the manifest unless params.mirror is
    set. Measurements are reused from `previous_manifest` for files that did not change;
    remote objects whose ETag and size match `previous_remote` are not downloaded again.
    `source_listing` and `collection_walk` are the source folder's and the collection's
    walks, when the caller has made them.
    """
    history, history_report = (None, None)
    if params.history is not None:
        history, history_report = read_history(params.history)
    if remote.is_remote(params.source):
        state = sync_remote_state.remote_state_rows(previous_remote)
        source_files, hidden, refused = remote_source_files(params.source, params.remote, state)
        workers = max(workers, REMOTE_WORKERS)
    else:
        source_files, hidden, refused = list_source(params.source, collection, source_listing)
    summary = SyncSummary(offered=len(source_files) + len(refused), hidden_skipped=hidden)
    collection.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(collection)

    previous = reusable_manifest(previous_manifest)
    # A set: a lookup in the manifest's index costs microseconds, at 100,000 files a second.
    previous_paths = set() if previous is None else set(previous.index.tolist())
    # Remote objects are reused one outcome at a time (with their ETags); unchanged local
    # files as table rows: a Python object a file costs seconds at 100,000 files.
    previous_rows = reusable_rows(previous_manifest) if remote.is_remote(params.source) else {}
    reused_paths: list[str] = []
    reused_labels: list[str | None] = []
    outcomes: list[FileOutcome] = [FileOutcome(name, None, reason) for name, reason in refused]
    tasks: list[BringTask | MeasureTask] = []
    for item in source_files:
        if item.remote is None and item.size > params.max_bytes:
            # Judged from the size the folder reports, before a byte is read (remote
            # objects are judged by their listing or their download).
            reason = f"{item.size} bytes, over sync.max_bytes ({params.max_bytes})"
            outcomes.append(FileOutcome(item.relative_path, None, reason, label=item.label))
            continue
        if item.remote is not None:
            reused = sync_remote_state.reuse_remote_outcome(
                item, previous_rows.get(item.relative_path), collection
            )
            if reused is not None:
                outcomes.append(reused)
                continue
        # A string path: pathlib's parsing costs seconds at 100,000 files.
        elif item.relative_path in previous_paths and is_unchanged(
            item, f"{collection}/{item.relative_path}"
        ):
            reused_paths.append(item.relative_path)
            reused_labels.append(item.label)
            continue
        tasks.append(BringTask(item, collection, params.max_pixels))

    offered_paths = {item.relative_path for item in source_files}
    existing = collection_files(collection, collection_walk)
    leftovers = [path for path in existing if path not in offered_paths]
    if params.mirror:
        for path in leftovers:
            (collection / path).unlink()
        summary.removed = len(leftovers)
        remove_empty_folders(collection)
    else:
        summary.kept = len(leftovers)
        for path in leftovers:
            if path in previous_paths and (collection / path).stat().st_size == int(
                previous.at[path, "bytes"]
            ):
                label = previous.at[path, "label"]
                reused_paths.append(path)
                reused_labels.append(None if pd.isna(label) else str(label))
            else:
                tasks.append(MeasureTask(path, collection, params.max_pixels))

    outcomes.extend(run_tasks(tasks, workers))
    rejected = pd.DataFrame(
        [(outcome.relative_path, outcome.reason) for outcome in outcomes if outcome.reason],
        columns=["path", "reason"],
    ).sort_values("path", ignore_index=True)
    summary.copied = sum(outcome.copied for outcome in outcomes)
    summary.rejected = len(rejected)
    measured = [measured_table(outcomes)]
    if reused_paths:
        assert previous is not None
        measured.append(reused_table(previous, reused_paths, reused_labels))
    manifest = build_manifest(pd.concat(measured, ignore_index=True), params.description, history)
    if manifest.empty:
        raise common.UserError(
            f"sync.source: {params.source} gave no usable image"
            + (f" ({len(rejected)} rejected; see the reasons above)" if len(rejected) else "")
        )
    remote_state = sync_remote_state.remote_state_table(source_files, outcomes)
    return SyncResult(manifest, rejected, summary, history_report, remote_state)


def run_tasks(tasks: list[BringTask | MeasureTask], workers: int) -> list[FileOutcome]:
    """Run file tasks on `workers` processes, with progress."""
    results = compute.map_tasks(run_task, tasks, workers, chunksize=16)
    return list(common.progress(results, len(tasks), STAGE))


def remove_empty_folders(collection: Path) -> None:
    """Remove folders that mirroring left empty, deepest first."""
    for directory in sorted(collection.rglob("*"), key=lambda path: len(path.parts), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def read_previous_manifest(path: Path) -> pd.DataFrame | None:
    """The manifest (or remote state) of the last run, if there is a readable one whose
    measurements were made as this code makes them (image_health.MEASUREMENT_VERSION)."""
    try:
        version = common.parquet_keys(path, made_by=STAGE).get("measurement")
        if path == common.MANIFEST_FILE and version != image_health.MEASUREMENT_VERSION:
            return None  # measured by other code: measure everything again
        return pd.read_parquet(path)
    except Exception:  # absent or unreadable: measure everything again
        return None


def main(checked: sync_last_run.Comparison | None = None, started: float | None = None) -> None:
    """Read params, sync the collection, write the manifest and the rejected list.

    For a folder source, a run that finds the source, the collection, the params and the
    outputs as the last run left them writes nothing (see sync_last_run). `checked` is
    that check when the caller made it (its walks are reused), `started` when it began.
    """
    started = time.perf_counter() if started is None else started
    logger = common.get_logger(STAGE)
    all_params = settings.load_params()
    params = SyncParams.from_params(all_params)
    compute.use_params(all_params)
    collection = common.COLLECTION_DIR
    folder = None if remote.is_remote(params.source) else source_folder(params.source, collection)
    if checked is None or folder is None or checked.source_folder != folder:
        checked = sync_last_run.compare_with_last_run()
    if checked.unchanged:
        sync_last_run.log_unchanged(checked, started)
        return
    source_listing = None if folder is None else checked.source
    collection_before = None if folder is None else checked.collection
    result = sync_collection(
        params,
        collection,
        read_previous_manifest(common.MANIFEST_FILE),
        common.worker_count(),
        read_previous_manifest(common.REMOTE_STATE_FILE),
        source_listing,
        collection_before,
    )
    manifest, rejected, summary = result.manifest, result.rejected, result.summary
    history_report = result.history
    common.write_parquet(
        manifest, common.MANIFEST_FILE, keys={"measurement": image_health.MEASUREMENT_VERSION}
    )
    common.write_bytes_atomic(rejected.to_csv(index=False).encode("utf-8"), common.REJECTED_FILE)
    common.write_parquet(result.remote_state, common.REMOTE_STATE_FILE)
    if source_listing is not None:
        inputs = sync_last_run.local_inputs_digest(
            sync_last_run.section_of(all_params), source_listing, collection_listing(collection)
        )
        written = sync_last_run.outputs_digest()
        if inputs is not None and written is not None:
            record = sync_last_run.record_bytes(sync_last_run.LastRun(inputs, written))
            common.write_bytes_atomic(record, sync_last_run.LAST_RUN_FILE)

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
