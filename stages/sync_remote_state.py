"""What sync remembers of a remote source's objects (data/raw/remote.parquet): the ETag
and size of each, and why it was refused, so that the next run downloads only new or
changed objects.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from stages.sync_files import FileOutcome
from stages.sync_manifest import outcome_from_row
from stages.sync_sources import SourceFile

COLUMNS = ["path", "url", "etag", "size", "reason"]


def remote_state_rows(previous: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """The last run's remote state by path (empty when there is none)."""
    if previous is None or not set(COLUMNS) <= set(previous.columns):
        return {}
    rows = previous.astype(object).where(previous.notna(), None).to_dict("records")
    return {str(row["path"]): row for row in rows}


def reuse_remote_outcome(
    item: SourceFile, row: dict[str, Any] | None, collection: Path
) -> FileOutcome | None:
    """The outcome of a remote object that has not changed since the last run (same ETag
    and size, its copy in place or its rejection on record), without downloading it;
    None when it must be fetched. URL lists tell no ETag: the server is asked instead."""
    assert item.remote is not None
    known = item.known
    if known is None or item.remote.etag is None or known.get("etag") != item.remote.etag:
        return None
    if known.get("size") is None or int(known["size"]) != item.size:
        return None
    if known.get("reason"):
        return FileOutcome(item.relative_path, None, str(known["reason"]), etag=item.remote.etag)
    destination = collection / item.relative_path
    if row is None or not destination.exists() or destination.stat().st_size != item.size:
        return None
    return replace(outcome_from_row(row, item.label), etag=item.remote.etag)


def remote_state_table(source_files: list[SourceFile], outcomes: list[FileOutcome]) -> pd.DataFrame:
    """What this run saw of each remote object, for the next run to compare against.

    A failed download has no ETag in its outcome, so the next run tries it again.
    """
    by_path = {outcome.relative_path: outcome for outcome in outcomes}
    rows = []
    for item in source_files:
        outcome = by_path.get(item.relative_path)
        if item.remote is None or outcome is None:
            continue
        size = outcome.measurement.bytes if outcome.measurement is not None else item.size
        rows.append(
            {
                "path": item.relative_path,
                "url": item.remote.url,
                "etag": outcome.etag,
                "size": size,
                "reason": outcome.reason,
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype(
        {"path": str, "url": str, "etag": object, "size": "Int64", "reason": object}
    )
