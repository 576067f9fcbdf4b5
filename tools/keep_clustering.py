"""Save a clustering as clusterings/NAME.parquet, for the explorer to compare with later runs.

Usage:
    python -m tools.keep_clustering NAME              # the workspace's clusters.parquet
    python -m tools.keep_clustering NAME --rev REV    # a commit's, branch's or experiment's

Only the columns id and cluster are kept. An existing file of that name is never replaced.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

import pandas as pd

from stages import common, explore

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def clusters_table(rev: str | None) -> pd.DataFrame:
    """The id and cluster columns of clusters.parquet: the workspace's, or `rev`'s through
    DVC (a git revision or an experiment's name; its outputs must be in the DVC cache or
    a remote)."""
    path = common.CLUSTERS_FILE
    if rev is None:
        return common.read_parquet(path, made_by="assign")[["id", "cluster"]]
    import dvc.api

    try:
        with dvc.api.open(str(path), rev=rev, mode="rb") as stream:
            return pd.read_parquet(io.BytesIO(stream.read()))[["id", "cluster"]]
    except Exception as error:  # dvc's many errors (unknown rev, output not cached)
        raise common.UserError(f"cannot read {path} at {rev!r}: {error}") from error


def keep_clustering(name: str, rev: str | None, folder: Path = explore.CLUSTERINGS_DIR) -> Path:
    """Write clusterings/NAME.parquet; refuse a bad name or one that already exists."""
    if not NAME_PATTERN.fullmatch(name):
        raise common.UserError(
            f"name {name!r}: use letters, digits, '.', '_' or '-' (up to 64, not starting "
            "with '.', '_' or '-')"
        )
    taken = [folder / f"{name}{suffix}" for suffix in explore.CLUSTERING_SUFFIXES]
    for path in taken:
        if path.exists():
            raise common.UserError(f"{path} already exists: choose another name or remove it")
    table = clusters_table(rev)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.parquet"
    common.write_parquet(table.reset_index(drop=True), target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the clustering's name on the page (the file's stem)")
    parser.add_argument("--rev", help="a git revision or experiment name (default: workspace)")
    arguments = parser.parse_args(argv)
    try:
        target = keep_clustering(arguments.name, arguments.rev)
    except common.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"saved {target}: run `dvc repro explore` to compare it on the page")
    return 0


if __name__ == "__main__":
    sys.exit(main())
