"""explore: an offline page to browse every image by cluster, like Facets Dive and Overview.

Params:  ExploreParams below (params.yaml, section explore)
Inputs:  data/processed/clusters.parquet (cluster, x, y), data/processed/scores.parquet
         (silhouette), data/processed/split.parquet, data/processed/near_groups.parquet,
         data/processed/neighbors.parquet, data/raw/manifest.parquet, data/raw/rejected.csv,
         data/interim/thumbs/ + ids.parquet, data/processed/image_patterns.parquet
         (the visual patterns each image holds), clusterings/ (other clusterings to
         compare: NAME.csv or NAME.parquet, columns id and cluster)
Outputs: reports/explorer/ (index.html, explorer.js, renderer.js, explorer.css, favicon.svg,
         data.js, atlas-NNN.js and icons-NNN.js: the sprite atlases, atlases.json: each
         one's key)

The page draws every image with WebGL2. Each atlas comes twice: full-size sprites
(atlas-NNN.js, fetched when the view zooms in far enough) and the same sprites as small
icons (icons-NNN.js, all loaded at once: ICON_PIXELS bounds them whatever the count).
Atlases travel as scripts holding the JPEG in base64, because a page opened from disk
may not read its own files' pixels any other way (Chromium makes every file:// file its
own origin, and WebGL refuses a cross-origin <img>).

Atlases are cut by cluster (the page's rows are ordered by cluster, in table order
within one), so a zoomed-in view of one cluster needs few full-size atlases, and a new
image changes only its cluster's last atlas. Their grid and the icons' size change only
when the largest cluster, or the number of atlases, passes a power of two. The folder is
a persistent output: a run keeps the atlases whose sprites are unchanged (by key) and
makes only the others. A cluster's last atlas, partly filled, is also kept as raw sprites
(a canvas in data/cache/explore/canvases/, by the key of the sprites it holds), so the
next run draws only the new images' sprites onto it, and encodes the same bytes as a
drawing from nothing. Beyond explore.max_images the atlases hold the page's sample and,
every other time its share shrinks, the images that just left it, as hidden sprites the
page skips (ATLAS_SHARE_STEPS): each step of a shrinking sample draws half the atlases
again (the clusters take turns), not all.

Near-duplicate copies are hidden until the page's "near-duplicate copies" box is ticked:
each group shows its representative, and an image's details name its group. An image's
details also show its most similar images on the page (health's nearest neighbours),
each a button that opens its own details.

Every table in clusterings/ is another clustering of the same images (an experiment's,
another method's, an earlier run's: `python -m tools.keep_clustering NAME` saves one).
The page can color by one and bin by another, and its overview shows their cross-table
and how well each agrees with this run's (adjusted Rand index, normalized mutual
information, over the images both cluster).

The page is self-contained: it loads only files of its own folder, so it opens from disk
(file://) and over HTTP alike, offline. The detail panel links the full-size image by a
relative path into data/raw/collections/. The page's own code is in stages/explorer_page/.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import orjson
import pandas as pd
import PIL
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field

from stages import common, settings, thumbnails

if TYPE_CHECKING:
    import logging

STAGE = "explore"
EXPLORER_DIR = Path("reports/explorer")
PAGE_FILES_DIR = Path(__file__).with_name("explorer_page")
PAGE_FILES = ("index.html", "explorer.js", "renderer.js", "explorer.css", "favicon.svg")
DATA_SCRIPT = "data.js"
# Each atlas's key (see atlas_key), so that the next run keeps the atlases whose sprites
# are unchanged instead of decoding and encoding them again.
ATLAS_KEYS_FILE = "atlases.json"
# px: a full-size atlas is one GPU texture layer on the page (16 MiB at 2048 px, RGBA).
# Small enough that a new image, which changes the last atlas of its cluster, costs few
# sprites to encode again; large enough that a million images need under 2048 atlases
# (the usual limit of texture layers).
MAX_ATLAS_SIDE = 2048
# Every image's icon stays loaded, one GPU texture layer an atlas: all the layers together
# hold at most this many pixels (190 MiB as RGBA) whatever the count: smaller icons for
# more images.
ICON_PIXELS = 48_000_000
MIN_ICON_HEIGHT = 4  # px
# Sprites read from the thumbnails at once for the atlases to draw: about 185 MB of JPEG.
SPRITE_BATCH_ROWS = 50_000
# Part of each atlas's key: a new format, or a new way to draw, remakes them.
ATLAS_FORMAT = "script-base64-jpeg-1 icons-gap-2"
ICON_REDUCING_GAP = 2.0
# A cluster's atlases hold a superset of the page's sample (common.PageSample) that
# shrinks every second time the sample's share does: in between, the images that just
# left the page stay in them as hidden sprites (at most a ninth more than the page shows).
# The clusters take turns (even clusters on even steps, odd ones on odd steps): each step
# (every ~11% of growth, when a tenth of the page's images leave it, which changed every
# atlas) draws half of the atlases again, not all.
ATLAS_SHARE_STEPS = 2
# Partly filled atlases as raw sprites (see the module docstring): as many as clusters.
CANVAS_DIR = common.CACHE_DIR / STAGE / "canvases"
TEXT_COLUMNS = ("id", "path", "subset", "place", "label", "taken_at", "month", "near_of")
NUMBER_COLUMNS = ("x", "y", "silhouette", "latitude", "longitude", "pattern")
COUNT_COLUMNS = ("cluster", "near_group", "near_size")
FLAG_COLUMNS = ("blank", "duplicate")
SIMILAR_SHOWN = 8  # nearest neighbours an image's details show
PAGE_SCORE_SCALE = 100  # pattern scores travel to the page in hundredths: it shows 2 places
NON_ASCII = re.compile(r"[^\x00-\x7f]")
CLUSTERINGS_DIR = Path("clusterings")
CLUSTERING_SUFFIXES = (".csv", ".parquet")


class ExploreParams(settings.Section):
    """params.yaml, section explore."""

    SECTION: ClassVar[str] = "explore"
    max_images: int = Field(
        100000,
        ge=1,
        description="the page shows at most this many images (a seeded sample beyond); "
        "the overview still counts the whole collection",
    )
    sprite_height: int = Field(
        54,
        ge=8,
        le=512,
        description="thumbnail height in the sprite atlases, px (the width keeps the "
        "thumbnails' aspect)",
    )
    atlas_quality: int = Field(85, ge=1, le=95, description="JPEG quality of the sprite atlases")
    seed: int = Field(42, ge=0, description="seed of the sample")


@dataclass(frozen=True)
class AtlasGrid:
    """How sprites are packed: `columns` x `rows` sprites of `width` x `height` px per atlas;
    its icon atlas holds the same grid of `icon_width` x `icon_height` px icons."""

    width: int
    height: int
    columns: int
    rows: int
    icon_width: int
    icon_height: int

    @property
    def per_atlas(self) -> int:
        """Sprites one atlas holds."""
        return self.columns * self.rows


@dataclass(frozen=True)
class Clustering:
    """Another clustering of the images, compared with this run's on the page."""

    name: str
    clusters: pd.Series  # cluster (int64) by id; an image it leaves out has none


# ----------------------------------------------------------------------------- table


def explorer_table(
    clusters: pd.DataFrame,
    scores: pd.DataFrame,
    split: pd.DataFrame,
    manifest: pd.DataFrame,
    near: pd.DataFrame,
    neighbors: pa.Table,
    image_patterns: pd.DataFrame | None = None,
) -> ExplorerTable:
    """One row per clustered image, in the clusters' order, with every field the page shows.

    The frame's columns: id, path, cluster, x, y, silhouette, subset, taken_at, month,
    place, latitude, longitude, label, blank, duplicate, near_group, near_of, near_size
    (from `near`, health's near-duplicate groups), pattern (the best visual pattern the
    image holds; NaN for none). Beside it, flat: the patterns each image holds and their
    scores, best score first (from `image_patterns`), and its nearest neighbours as rows
    of the table, nearest first (from health's `neighbors`: id, neighbors).
    """
    table = clusters[["id", "cluster", "x", "y"]].copy()
    groups = near.set_index("id").reindex(table["id"])
    table["near_group"] = groups["near_group"].fillna(0).astype(np.int64).to_numpy()
    table["near_of"] = groups["near_of"].to_numpy()
    table["near_size"] = groups["near_size"].fillna(1).astype(np.int64).to_numpy()
    table["silhouette"] = scores.set_index("id")["silhouette"].reindex(table["id"]).to_numpy()
    table["subset"] = split.set_index("id")["subset"].reindex(table["id"]).to_numpy()
    fields = ["path", "taken_at", "place", "latitude", "longitude", "label", "blank", "duplicate"]
    details = manifest.set_index("id")[fields].reindex(table["id"])
    for field in fields:
        table[field] = details[field].to_numpy()
    patterns, pattern_scores = pattern_lists(table["id"], image_patterns)
    table["pattern"] = patterns.firsts()
    taken_at = pd.to_datetime(table["taken_at"])
    table["month"] = taken_at.dt.strftime("%Y-%m")
    table["taken_at"] = taken_at.dt.strftime("%Y-%m-%d %H:%M:%S")
    return ExplorerTable(table, patterns, pattern_scores, neighbour_rows(table["id"], neighbors))


def positions_in(values: pa.Array | pa.ChunkedArray, ids: pa.Array) -> np.ndarray:
    """The position in `ids` of each of `values` (-1 for one not in it), looked up in Arrow:
    a million neighbour ids as Python strings cost a second."""
    text = pa.string()
    found = pc.index_in(values.cast(text), value_set=ids.cast(text)).fill_null(-1)
    return found.to_numpy(zero_copy_only=False).astype(np.int64)


def neighbour_rows(ids: pd.Series, neighbors: pa.Table) -> RowLists:
    """Each of `ids`' nearest neighbours (health's table: id, neighbors) as positions in
    `ids` (-1 for one not among them), nearest first; no neighbours for an id the table
    lacks."""
    if not neighbors.num_rows:
        return RowLists(np.empty(0, np.int64), np.zeros(len(ids) + 1, np.int64))
    wanted = pa.array(ids.to_numpy(object), pa.string())
    lists = neighbors["neighbors"].combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]  # a sliced array's offsets start further in
    # One more, empty, row last: the lists of the ids the table lacks.
    held = RowLists(positions_in(lists.flatten(), wanted), np.append(offsets, offsets[-1]))
    row = positions_in(wanted, neighbors["id"].combine_chunks())
    return held.take(np.where(row >= 0, row, len(lists)))


@dataclass(frozen=True)
class RowLists:
    """Lists of numbers, one a row, held flat: row i holds values[starts[i]:starts[i + 1]].

    The explorer's patterns and similar images are dozens of numbers for each of up to
    100,000 rows: as Python lists, made and written to JSON one row at a time, they took
    3 s of a daily run; flat, they take a few numpy calls, and the page splits them.
    """

    values: np.ndarray
    starts: np.ndarray  # int64, one more than the rows; starts[0] == 0

    @classmethod
    def of(cls, lists: Iterable[Any], dtype: type = np.int64) -> RowLists:
        """The flat form of per-row lists (or arrays); None or NaN is an empty row."""
        rows = [np.asarray(v if isinstance(v, list | np.ndarray) else (), dtype) for v in lists]
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        values = np.concatenate(rows) if rows else np.empty(0, dtype)
        return cls(values.astype(dtype, copy=False), np.concatenate(([0], np.cumsum(lengths))))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def take(self, rows: np.ndarray) -> RowLists:
        """The lists of `rows`, in that order."""
        counts = np.diff(self.starts)[rows]
        starts = np.concatenate(([0], np.cumsum(counts)))
        # Each taken value's place: its row's start in self, plus its rank in the row.
        rank = np.arange(starts[-1]) - np.repeat(starts[:-1], counts)
        return RowLists(self.values[np.repeat(self.starts[:-1][rows], counts) + rank], starts)

    def rows(self) -> list[np.ndarray]:
        """Each row's values, as views of the flat array."""
        return np.split(self.values, self.starts[1:-1]) if len(self) else []

    def firsts(self) -> np.ndarray:
        """Each row's first value as a float; NaN for an empty row."""
        present = np.diff(self.starts) > 0
        found = np.full(len(self), np.nan)
        found[present] = self.values[self.starts[:-1][present]]
        return found

    def page_column(self, scale: int = 1) -> dict[str, Any]:
        """The page's form: each row's count and the values in a row, as integers: the
        values times `scale`, for fractions (integers are shorter JSON, faster to write)."""
        values = self.values if scale == 1 else np.round(self.values * scale)
        return {"counts": np.diff(self.starts), "values": values.astype(np.int64), "scale": scale}


@dataclass(frozen=True)
class ExplorerTable:
    """The explorer's rows: their fields in `frame`, and beside it, row-aligned and flat,
    the patterns each image holds, their scores, and its nearest neighbours (as rows of
    the table, -1 for an image not in it)."""

    frame: pd.DataFrame
    patterns: RowLists
    pattern_scores: RowLists
    neighbors: RowLists

    LIST_COLUMNS: ClassVar[tuple[str, ...]] = ("neighbors", "patterns", "pattern_scores")

    @classmethod
    def of_frame(cls, frame: pd.DataFrame) -> ExplorerTable:
        """A table from one frame whose neighbors (ids), patterns and pattern_scores
        columns hold a list a row, as tests and benchmarks write one."""
        ids = pa.array(frame["id"].tolist(), pa.string())
        lists = pa.array(frame["neighbors"].tolist(), pa.list_(pa.string()))
        neighbors = pa.table({"id": ids, "neighbors": lists})
        return cls(
            frame.drop(columns=list(cls.LIST_COLUMNS)).reset_index(drop=True),
            RowLists.of(frame["patterns"]),
            RowLists.of(frame["pattern_scores"], np.float64),
            neighbour_rows(frame["id"], neighbors),
        )

    def __len__(self) -> int:
        return len(self.frame)

    def take(self, rows: np.ndarray) -> ExplorerTable:
        """The table's `rows`, in that order (the neighbours still name the whole table's
        rows)."""
        return ExplorerTable(
            self.frame.iloc[rows].reset_index(drop=True),
            self.patterns.take(rows),
            self.pattern_scores.take(rows),
            self.neighbors.take(rows),
        )


def pattern_lists(ids: pd.Series, image_patterns: pd.DataFrame | None) -> tuple[RowLists, RowLists]:
    """The patterns each of `ids` holds and their scores (rounded to 3 places), best score
    first (then by pattern), from image_patterns (id, pattern, score): sorted as numbers,
    not grouped by pandas, which took 4 s for 3.5 million rows."""
    if image_patterns is None or image_patterns.empty:
        none = np.zeros(len(ids) + 1, np.int64)
        return RowLists(np.empty(0, np.int64), none), RowLists(np.empty(0), none)
    holder = image_patterns["id"]
    if isinstance(holder.dtype, pd.CategoricalDtype):  # each id looked up once, not per row
        codes = holder.cat.codes.to_numpy()
        row = pd.Index(ids).get_indexer(holder.cat.categories)[codes]
    else:
        row = pd.Index(ids).get_indexer(holder)
    pattern = image_patterns["pattern"].to_numpy(np.int64)
    score = image_patterns["score"].to_numpy(np.float64)
    order = np.lexsort((pattern, -score, row))
    order = order[row[order] >= 0]
    starts = np.searchsorted(row[order], np.arange(len(ids) + 1))
    return RowLists(pattern[order], starts), RowLists(np.round(score[order], 3), starts)


def collection_summary(
    manifest: pd.DataFrame, rejected_count: int, clustered: int, near: pd.DataFrame
) -> dict[str, int]:
    """Counts for the overview tab that the page's own rows cannot tell (build_explorer
    adds how many images the page shows)."""
    grouped = near[near["near_group"] > 0]
    return {
        "near_groups": int(grouped["near_group"].nunique()),
        "near_copies": int(grouped["near_of"].notna().sum()),
        "collection_images": len(manifest),
        "clustered_images": clustered,
        "rejected_files": rejected_count,
        "with_timestamp": int(manifest["taken_at"].notna().sum()),
        "with_location": int((manifest["latitude"].notna() & manifest["longitude"].notna()).sum()),
        "blank_images": int(manifest["blank"].sum()),
        "duplicate_images": int(manifest["duplicate"].sum()),
    }


def json_column(values: pd.Series, kind: str) -> list[Any] | np.ndarray:
    """A column as the page data holds it: text as strings (None for missing); numbers
    rounded to 5 places and flags as arrays, which the JSON writer turns into numbers,
    null for NaN, and true or false."""
    if kind == "text":
        present = values.notna().to_numpy()
        return [str(v) if ok else None for v, ok in zip(values.tolist(), present)]
    if kind == "flag":
        return values.fillna(False).to_numpy(bool)
    return np.round(values.to_numpy(np.float64, na_value=np.nan), 5)


def similar_positions(near: RowLists, position: np.ndarray, shown: int = SIMILAR_SHOWN) -> RowLists:
    """For each row, the page positions of its nearest neighbours that are on the page,
    nearest first, at most `shown`: the similar images its details show. `near` holds each
    row's neighbours as table rows (-1 for none), `position` each table row's place on the
    page (-1 for one not on it)."""
    found = np.where(near.values >= 0, position[near.values], -1)
    owner = np.repeat(np.arange(len(near)), np.diff(near.starts))
    on_page = np.flatnonzero(found >= 0)
    # A found neighbour's rank among its row's found ones: the first `shown` are kept.
    first_found = np.searchsorted(owner[on_page], np.arange(len(near)))
    kept = on_page[np.arange(len(on_page)) - first_found[owner[on_page]] < shown]
    counts = np.bincount(owner[kept], minlength=len(near))
    return RowLists(found[kept].astype(np.int64), np.concatenate(([0], np.cumsum(counts))))


# ----------------------------------------------------------------------------- clusterings


def clustering_table(path: Path) -> pd.Series:
    """A clustering file (CSV or parquet with columns id and cluster) as clusters by id.

    Rows with no cluster are left out. Raises UserError naming the file and the problem.
    """
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, dtype={"id": str}, keep_default_na=False, na_values=[""])
    except Exception as error:  # any reader's failure: the file is not a table
        raise common.UserError(f"{path}: cannot be read as a table ({error})") from error
    missing = {"id", "cluster"} - set(table.columns)
    if missing:
        raise common.UserError(f"{path}: needs columns id and cluster; missing {sorted(missing)}")
    table = table[table["cluster"].notna()]
    clusters = pd.to_numeric(table["cluster"], errors="coerce")
    bad = table["cluster"][clusters.isna() | (clusters != clusters.round())]
    if len(bad):
        raise common.UserError(f"{path}: cluster '{bad.iloc[0]}' is not a whole number")
    ids = table["id"].astype(str)
    repeated = ids[ids.duplicated()]
    if len(repeated):
        raise common.UserError(f"{path}: id {repeated.iloc[0]!r} appears more than once")
    return pd.Series(clusters.to_numpy(np.int64), index=pd.Index(ids.to_numpy(), name="id"))


def read_clusterings(folder: Path, logger: logging.Logger) -> list[Clustering]:
    """Every clustering file in `folder`, named by its stem, in name order. A file that
    cannot be used is skipped with a warning naming it: the page is still written."""
    clusterings: list[Clustering] = []
    names: set[str] = set()
    paths = sorted(folder.glob("*")) if folder.is_dir() else []
    for path in paths:
        if path.suffix not in CLUSTERING_SUFFIXES or not path.is_file():
            continue
        if path.stem in names:
            logger.warning("%s skipped: another file is already named %s", path, path.stem)
            continue
        try:
            clusterings.append(Clustering(path.stem, clustering_table(path)))
        except common.UserError as error:
            logger.warning("%s; skipped", error)
            continue
        names.add(path.stem)
    return clusterings


def agreement(ours: pd.Series, other: pd.Series) -> dict[str, float | int]:
    """How well two clusterings (clusters by id) agree on the images both cluster:
    adjusted Rand index and normalized mutual information (1: the same partition)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    shared = ours.index.intersection(other.index)
    if len(shared) == 0:
        return {"shared": 0, "ari": None, "nmi": None}
    left, right = ours.loc[shared].to_numpy(), other.loc[shared].to_numpy()
    return {
        "shared": len(shared),
        "ari": round(float(adjusted_rand_score(left, right)), 5),
        "nmi": round(float(normalized_mutual_info_score(left, right)), 5),
    }


def compared_clusterings(
    shown: pd.DataFrame, everything: pd.DataFrame, clusterings: list[Clustering]
) -> list[dict[str, Any]]:
    """Each other clustering as the page reads it: its name, its cluster of each shown
    image (None where it has none), and its agreement with this run's over every image."""
    ours = pd.Series(everything["cluster"].to_numpy(np.int64), index=everything["id"])
    result = []
    for clustering in clusterings:
        on_page = clustering.clusters.reindex(shown["id"])
        result.append(
            {
                "name": clustering.name,
                "clusters": [None if pd.isna(v) else int(v) for v in on_page.tolist()],
                "images": len(clustering.clusters),
                "cluster_count": int(clustering.clusters.nunique()),
                **agreement(ours, clustering.clusters),
            }
        )
    return result


# ----------------------------------------------------------------------------- page data


def page_data(
    table: ExplorerTable,
    similar: RowLists,
    hidden: np.ndarray,
    grid: AtlasGrid,
    block_sizes: list[int],
    summary: dict,
    collection: str,
    clusterings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the page reads, as one JSON-ready dict (columns, not rows: smaller, faster);
    `table` holds the page's rows in order, `similar` each row's similar images as page
    positions (see similar_positions), `hidden` the sprites, numbered across the atlases
    in order, that no row of the page shows (the rows are the other sprites, in order),
    `block_sizes` the atlases' sprite counts and `clusterings` the other clusterings as
    compared_clusterings gives them."""
    frame = table.frame
    columns: dict[str, Any] = {name: frame[name].to_numpy(np.int64) for name in COUNT_COLUMNS}
    for name in TEXT_COLUMNS:
        columns[name] = json_column(frame[name], "text")
    for name in NUMBER_COLUMNS:
        columns[name] = json_column(frame[name], "number")
    for name in FLAG_COLUMNS:
        columns[name] = json_column(frame[name], "flag")
    columns["similar"] = similar.page_column()
    columns["patterns"] = table.patterns.page_column()
    columns["pattern_scores"] = table.pattern_scores.page_column(PAGE_SCORE_SCALE)
    return {
        "count": len(table),
        "columns": columns,
        "sprite": {"width": grid.width, "height": grid.height},
        "atlas": {
            "columns": grid.columns,
            "rows": grid.rows,
            "sizes": block_sizes,
            "files": (files := atlas_names(len(block_sizes))),
            "icons": [icons_name(name) for name in files],
            "icon": {"width": grid.icon_width, "height": grid.icon_height},
            "hidden": np.asarray(hidden, np.int64),
        },
        "collection": collection,
        "summary": summary,
        "clusterings": clusterings or [],
    }


def data_script(data: dict[str, Any]) -> str:
    """The data as a script that sets window.EXPLORER_DATA.

    A script, not a JSON file, because browsers refuse fetch() of files from file:// pages.
    ASCII-only JSON with '<' escaped cannot end the script or be read as markup. Written by
    orjson, numpy arrays as they are: Python's json module took most of a second for
    100,000 rows.
    """
    text = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY).decode("utf-8")
    if not text.isascii():
        text = NON_ASCII.sub(json_escape, text)
    text = text.replace("<", "\\u003c")
    return f"window.EXPLORER_DATA = {text};\n"


def json_escape(match: re.Match[str]) -> str:
    """A character as JSON's \\u escape (two, a surrogate pair, beyond the first plane)."""
    return json.dumps(match.group(0))[1:-1]


# ----------------------------------------------------------------------------- atlases


def atlas_grid(
    thumb_shape: tuple[int, int], sprite_height: int, count: int, atlases: int | None = None
) -> AtlasGrid:
    """Sprite size from the thumbnails' (height, width), the grid of one atlas for at most
    `count` sprites, and the icons' size for `atlases` atlases of that grid.

    An atlas holds as many sprites as fit in MAX_ATLAS_SIDE on both sides, and no more
    than `count` needs (the most one atlas is given), so small clusters get small atlases.
    Icons are as large as ICON_PIXELS allows for `atlases` (by default, as many as
    `count` sprites fill), from MIN_ICON_HEIGHT to half the sprite.
    """
    thumb_height, thumb_width = thumb_shape
    height = min(sprite_height, MAX_ATLAS_SIDE)
    width = max(1, min(MAX_ATLAS_SIDE, round(height * thumb_width / thumb_height)))
    columns = max(1, min(MAX_ATLAS_SIDE // width, math.ceil(math.sqrt(count * height / width))))
    rows = max(1, min(MAX_ATLAS_SIDE // height, math.ceil(count / columns)))
    atlases = math.ceil(count / (columns * rows)) if atlases is None else atlases
    per_icon = ICON_PIXELS / max(1, atlases * columns * rows)
    fitting = math.floor(math.sqrt(per_icon * height / width))
    icon_height = max(1, min(max(MIN_ICON_HEIGHT, height // 2), max(MIN_ICON_HEIGHT, fitting)))
    icon_width = max(1, round(icon_height * width / height))
    return AtlasGrid(width, height, columns, rows, icon_width, icon_height)


def sprite(thumb: np.ndarray | Image.Image, grid: AtlasGrid) -> np.ndarray:
    """One thumbnail's pixels at sprite size."""
    if isinstance(thumb, np.ndarray) and thumb.shape[:2] == (grid.height, grid.width):
        return thumb
    image = thumb if isinstance(thumb, Image.Image) else Image.fromarray(np.asarray(thumb))
    if image.size != (grid.width, grid.height):
        image = image.resize((grid.width, grid.height), Image.Resampling.LANCZOS)
    return np.asarray(image)


def atlas(
    thumbs: thumbnails.ThumbnailRows,
    rows: np.ndarray,
    grid: AtlasGrid,
    canvas: Image.Image | None = None,
    drawn: int = 0,
) -> Image.Image:
    """One atlas of the sprites of thumbs[rows], row by row; from a `canvas` that holds the
    first `drawn` of them, where given."""
    return atlas_of_sprites((thumbs[row] for row in rows[drawn:]), len(rows), grid, canvas, drawn)


def atlas_of_sprites(
    thumbs: Iterable[np.ndarray | Image.Image],
    count: int,
    grid: AtlasGrid,
    canvas: Image.Image | None = None,
    drawn: int = 0,
) -> Image.Image:
    """An atlas of `count` sprites: the first `drawn` from `canvas` (none: nothing drawn),
    the rest from `thumbs`, in order, on black. Drawn as an array: Pillow's paste took 90
    microseconds a sprite, most of the time of an atlas."""
    used_rows = math.ceil(count / grid.columns)
    pixels = np.zeros((used_rows * grid.height, grid.columns * grid.width, 3), np.uint8)
    if canvas is not None:
        held = np.asarray(canvas)[: pixels.shape[0], : pixels.shape[1]]
        pixels[: held.shape[0], : held.shape[1]] = held
    for index, thumb in enumerate(thumbs, start=drawn):
        top, left = (index // grid.columns) * grid.height, (index % grid.columns) * grid.width
        pixels[top : top + grid.height, left : left + grid.width] = sprite(thumb, grid)
    return Image.fromarray(pixels)


def power_of_two(count: int) -> int:
    """The least power of two at least `count` (1 for 0)."""
    return 1 << max(0, count - 1).bit_length()


def icon_atlas(image: Image.Image, grid: AtlasGrid) -> Image.Image:
    """An atlas at icon size: the same grid, each sprite shrunk to an icon. (A filter
    that crosses a sprite's edge blends only its border, which the page covers with
    the image's color frame.)"""
    columns = image.width // grid.width
    used_rows = image.height // grid.height
    size = (columns * grid.icon_width, used_rows * grid.icon_height)
    # Pillow first shrinks by a whole factor (boxes of pixels), then filters: at 2.0, 13 ms
    # an atlas instead of 33 at 3.0, for icons of a few pixels either way.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=ICON_REDUCING_GAP)


def atlas_blocks(
    rows: np.ndarray, grid: AtlasGrid, clusters: np.ndarray | None = None
) -> list[np.ndarray]:
    """The rows of each atlas: per_atlas rows at most, and, given the `clusters` of `rows`
    (in runs: rows ordered by cluster), never two clusters in one atlas. The k-th sprite
    of an atlas sits at column k % columns and row k // columns."""
    starts = [0] if clusters is None else [0, *(np.flatnonzero(np.diff(clusters)) + 1)]
    ends = [*starts[1:], len(rows)]
    return [
        rows[begin : min(begin + grid.per_atlas, end)]
        for start, end in zip(starts, ends, strict=True)
        for begin in range(start, end, grid.per_atlas)
    ]


def atlases(
    thumbs: thumbnails.ThumbnailRows, rows: np.ndarray, grid: AtlasGrid
) -> Iterator[Image.Image]:
    """The sprite atlases of thumbs[rows], in order (see atlas_blocks)."""
    for block in atlas_blocks(rows, grid):
        yield atlas(thumbs, block, grid)


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    """An image as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def atlas_script(jpeg: bytes) -> bytes:
    """A JPEG as a script that hands its base64 to the page (see the module docstring).
    The script does not name itself: the page knows which script element it added."""
    return b'explorerAtlas(document.currentScript,"' + base64.b64encode(jpeg) + b'");\n'


def atlas_scripts(image: Image.Image, grid: AtlasGrid, quality: int) -> tuple[bytes, bytes]:
    """An atlas's two script files: full-size sprites, and icons."""
    return (
        atlas_script(jpeg_bytes(image, quality)),
        atlas_script(jpeg_bytes(icon_atlas(image, grid), quality)),
    )


@dataclass(frozen=True)
class CanvasPlan:
    """How an atlas is drawn: from the canvas `start` that holds its first `drawn` sprites
    (none: from nothing), and whether its own canvas is saved at `save` for the next run."""

    start: Path | None = None
    drawn: int = 0
    save: Path | None = None


def names_sprites(thumbs: thumbnails.ThumbnailRows, sha256s: list[str] | None) -> bool:
    """Whether a sprite can be named without reading it: by the stored thumbnails' key and
    its file's sha256."""
    return isinstance(thumbs, thumbnails.Thumbnails) and bool(thumbs.key) and sha256s is not None


def canvas_keys(
    thumbs: thumbnails.Thumbnails, rows: np.ndarray, grid: AtlasGrid, sha256s: list[str]
) -> list[str]:
    """The key of the canvas of each run of an atlas's first sprites (index i: the first i),
    named as atlas_key names sprites (see names_sprites)."""
    head = json.dumps([dataclasses.astuple(grid), PIL.__version__, "canvas", thumbs.key])
    digest = hashlib.sha256(head.encode())
    keys = [digest.hexdigest()]
    for row in rows:
        digest.update(sha256s[int(row)].encode())
        keys.append(digest.hexdigest())
    return keys


def canvas_plan(keys: list[str], held: set[str], full: bool, folder: Path) -> CanvasPlan:
    """Start from the held canvas of the most sprites, and save a partly filled atlas's."""
    drawn = next((count for count in range(len(keys) - 1, 0, -1) if keys[count] in held), 0)
    start = folder / f"{keys[drawn]}.npy" if drawn else None
    return CanvasPlan(start, drawn, None if full else folder / f"{keys[-1]}.npy")


def read_canvas(plan: CanvasPlan) -> Image.Image | None:
    """The canvas a plan starts from (none when it starts from nothing or the file is gone)."""
    if plan.start is None:
        return None
    try:
        return Image.fromarray(np.load(plan.start))
    except (OSError, ValueError):
        return None


def save_canvas(image: Image.Image, path: Path) -> None:
    """An atlas's raw sprites, for the next run to draw onto."""
    with common.atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.save(file, np.asarray(image))


def atlas_file_task(
    task: tuple[Path, np.ndarray, AtlasGrid, int, CanvasPlan, list[bytes]],
) -> tuple[bytes, bytes]:
    """The two script files of one atlas of stored thumbnails (a task for a process), drawn
    onto and saved as its plan says: `jpegs` are the stored thumbnails of the rows its
    canvas lacks (rows[plan.drawn:])."""
    path, rows, grid, quality, plan, jpegs = task
    canvas = read_canvas(plan)
    if canvas is None and plan.drawn:  # the canvas is gone or damaged: draw from nothing
        image = atlas(thumbnails.Thumbnails(path), rows, grid)
    else:
        sprites = map(thumbnails.decode, jpegs)
        image = atlas_of_sprites(sprites, len(rows), grid, canvas, plan.drawn)
    if plan.save is not None:
        save_canvas(image, plan.save)
    return atlas_scripts(image, grid, quality)


def sprite_batches(counts: list[int], limit: int = SPRITE_BATCH_ROWS) -> list[list[int]]:
    """Positions of `counts` in consecutive batches of at most `limit` in all (an item
    larger than the limit makes a batch alone)."""
    batches: list[list[int]] = []
    total = limit
    for position, count in enumerate(counts):
        if total + count > limit:
            batches.append([])
            total = 0
        batches[-1].append(position)
        total += count
    return batches


def stored_atlas_files(
    thumbs: thumbnails.Thumbnails,
    blocks: list[np.ndarray],
    made: list[int],
    grid: AtlasGrid,
    quality: int,
    workers: int,
    plans: dict[int, CanvasPlan],
) -> Iterator[tuple[bytes, bytes]]:
    """The two script files of the blocks `made`, in order, drawn on `workers` processes
    (an atlas a task, which sends back only its few MB of scripts). The sprites each atlas
    still lacks are read in batches, a pass over the table's row groups for all the
    atlases of a batch: a cluster's images lie in nearly every row group, and a task
    reading its own took 0.2 s an atlas, most of a day that draws every atlas again."""
    steps = {index: plans.get(index, CanvasPlan()) for index in made}
    lacking = {index: blocks[index][steps[index].drawn :] for index in made}
    for batch in sprite_batches([len(lacking[index]) for index in made]):
        indices = [made[position] for position in batch]
        jpegs = thumbs.jpeg_sets([lacking[index] for index in indices])
        tasks = [
            (thumbs.path, blocks[index], grid, quality, steps[index], held)
            for index, held in zip(indices, jpegs)
        ]
        yield from common.map_in_processes(atlas_file_task, tasks, workers)


def atlas_key(
    thumbs: thumbnails.ThumbnailRows,
    rows: np.ndarray,
    grid: AtlasGrid,
    quality: int,
    sha256s: list[str] | None = None,
) -> str:
    """What an atlas's bytes depend on: its grid, the JPEG quality and encoder, and its
    sprites in order: named by the thumbnails' key and the files' `sha256s` where both are
    known (reading no thumbnail), else by their stored JPEG bytes (or pixels, for an
    array)."""
    digest = hashlib.sha256(
        json.dumps([dataclasses.astuple(grid), quality, PIL.__version__, ATLAS_FORMAT]).encode()
    )
    if names_sprites(thumbs, sha256s):
        digest.update(f"thumbnails {thumbs.key}".encode())
        for row in rows:
            digest.update(sha256s[int(row)].encode())
    elif isinstance(thumbs, thumbnails.Thumbnails):
        for row in rows:
            digest.update(hashlib.sha256(thumbs.jpeg(int(row))).digest())
    else:
        digest.update(np.ascontiguousarray(thumbs[rows]).tobytes())
    return digest.hexdigest()


def icons_name(atlas_name: str) -> str:
    """The icon atlas's file name of a full-size atlas's (atlas-007.js: icons-007.js)."""
    return "icons-" + atlas_name.removeprefix("atlas-")


def earlier_atlases(directory: Path) -> dict[str, tuple[Path, Path]]:
    """The atlases the last run left in `directory` (full-size and icon files), by key;
    none when it left no keys."""
    try:
        names = json.loads((directory / ATLAS_KEYS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(names, dict):
        return {}
    found = {}
    for name, key in names.items():
        files = (directory / str(name), directory / icons_name(str(name)))
        if all(path.is_file() for path in files):
            found[str(key)] = files
    return found


def atlas_files(
    thumbs: thumbnails.ThumbnailRows,
    blocks: list[np.ndarray],
    grid: AtlasGrid,
    quality: int,
    workers: int,
    kept: dict[int, tuple[Path, Path]] | None = None,
    plans: dict[int, CanvasPlan] | None = None,
) -> Iterator[tuple[bytes, bytes] | tuple[Path, Path]]:
    """The two script files (full-size, icons) of each block of rows, in order: their
    bytes, or for block i of `kept` the files that already hold them. Stored thumbnails
    are drawn on `workers` processes (see stored_atlas_files; block i as its entry of
    `plans` says)."""
    kept, plans = kept or {}, plans or {}
    made = [index for index in range(len(blocks)) if index not in kept]
    if isinstance(thumbs, thumbnails.Thumbnails):
        fresh = stored_atlas_files(thumbs, blocks, made, grid, quality, workers, plans)
    else:
        fresh = (atlas_scripts(atlas(thumbs, blocks[index], grid), grid, quality) for index in made)
    for index in range(len(blocks)):
        yield kept[index] if index in kept else next(fresh)


def place_file(content: bytes | Path, path: Path) -> None:
    """Write bytes at `path`, or link an earlier file there: a kept atlas is neither read
    nor written again, and DVC knows its hash by its inode."""
    if isinstance(content, bytes):
        path.write_bytes(content)
        return
    try:
        os.link(content, path)
    except OSError:  # a file system without hard links
        shutil.copyfile(content, path)


# ----------------------------------------------------------------------------- output


def write_explorer(
    directory: Path,
    data: dict[str, Any],
    atlas_pairs: Iterator[tuple[bytes, bytes] | tuple[Path, Path]],
    atlas_keys: list[str],
) -> None:
    """Write the page, its data script, its atlases and their keys into `directory`,
    replacing it as a whole.

    Each atlas's scripts are saved under its names in data["atlas"]["files"] and
    data["atlas"]["icons"]; the counts must agree.
    """
    names = data["atlas"]["files"]
    with common.replace_folder(directory) as staging:
        for name, (full, icons) in zip(names, atlas_pairs, strict=True):
            place_file(full, staging / name)
            place_file(icons, staging / icons_name(name))
        keys = dict(zip(names, atlas_keys, strict=True))
        (staging / ATLAS_KEYS_FILE).write_text(json.dumps(keys, indent=1) + "\n")
        (staging / DATA_SCRIPT).write_text(data_script(data), encoding="ascii")
        for name in PAGE_FILES:
            shutil.copyfile(PAGE_FILES_DIR / name, staging / name)


def atlas_names(block_count: int) -> list[str]:
    """The full-size atlases' file names (icons_name gives their icon atlases')."""
    return [f"atlas-{index:03d}.js" for index in range(block_count)]


def read_rejected_count(path: Path = common.REJECTED_FILE) -> int:
    """How many files sync rejected (0 when it has written no list)."""
    if not path.exists():
        return 0
    return len(pd.read_csv(path, dtype=str, keep_default_na=False))


def build_explorer(
    table: ExplorerTable,
    thumbs: thumbnails.ThumbnailRows,
    summary: dict[str, int],
    params: ExploreParams,
    directory: Path,
    collection_dir: Path,
    sha256s: list[str] | None = None,
    clusterings: list[Clustering] | None = None,
    canvas_folder: Path = CANVAS_DIR,
) -> tuple[dict[str, Any], int]:
    """Write the explorer of `table` (row-aligned with `thumbs`, and with `sha256s`, the
    files' hashes, which choose the sample beyond params.max_images) into `directory`,
    with `clusterings` to compare with this run's; partly filled atlases are kept in
    `canvas_folder` for the next run to draw onto.

    Returns the page data and how many atlases were kept from the last run.
    """
    keys = table.frame["id"].tolist() if sha256s is None else sha256s
    sample = common.content_page_sample(keys, params.max_images, params.seed, ATLAS_SHARE_STEPS)
    clusters = table.frame["cluster"].to_numpy()
    drawn = sample.superset(clusters % ATLAS_SHARE_STEPS)  # the clusters take turns
    # By cluster, in table order within one: each atlas then holds one cluster's images.
    sprites = drawn[np.argsort(clusters[drawn], kind="stable")]  # the atlases' rows, in order
    on_page = np.isin(sprites, sample.rows)
    rows = sprites[on_page]  # the page's rows, in the same order
    shown = table.take(rows)
    position = np.full(len(table), -1, np.int64)
    position[rows] = np.arange(len(rows))
    # The grid fits the largest cluster (up to MAX_ATLAS_SIDE) and the icons fit all the
    # atlases, both rounded up to a power of two: a daily run keeps them, and so the atlases.
    runs = np.diff(np.flatnonzero(np.diff(clusters[sprites], prepend=-2, append=-2)))
    largest = power_of_two(int(runs.max(initial=1)))
    grid = atlas_grid(thumbs.shape[1:3], params.sprite_height, largest)
    blocks = atlas_blocks(sprites, grid, clusters[sprites])
    grid = atlas_grid(thumbs.shape[1:3], params.sprite_height, largest, power_of_two(len(blocks)))
    collection = Path(os.path.relpath(collection_dir, directory)).as_posix() + "/"
    summary = {**summary, "shown_images": len(rows)}
    compared = compared_clusterings(shown.frame, table.frame, clusterings or [])
    sizes = [len(block) for block in blocks]
    similar = similar_positions(shown.neighbors, position)
    hidden = np.flatnonzero(~on_page)
    data = page_data(shown, similar, hidden, grid, sizes, summary, collection, compared)
    atlas_keys = [atlas_key(thumbs, block, grid, params.atlas_quality, sha256s) for block in blocks]
    earlier = earlier_atlases(directory)
    kept = {index: earlier[key] for index, key in enumerate(atlas_keys) if key in earlier}
    named = names_sprites(thumbs, sha256s)  # else no canvas can be named
    held = {path.stem for path in canvas_folder.glob("*.npy")} if named else set()
    plans, partly_filled = {}, set()
    for index, block in enumerate(blocks if named else []):
        keys = canvas_keys(thumbs, block, grid, sha256s)
        full = len(block) == grid.per_atlas
        if not full:
            partly_filled.add(keys[-1])
        if index not in kept:
            plans[index] = canvas_plan(keys, held, full, canvas_folder)
    quality, workers = params.atlas_quality, common.worker_count()
    scripts = atlas_files(thumbs, blocks, grid, quality, workers, kept, plans)
    write_explorer(directory, data, scripts, atlas_keys)
    # Only the canvases of this run's partly filled atlases can grow tomorrow.
    for key in held - partly_filled:
        (canvas_folder / f"{key}.npy").unlink(missing_ok=True)
    return data, len(kept)


def main() -> None:
    """Read clusters, scores, split, manifest and thumbnails; write reports/explorer/."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = ExploreParams.from_params(settings.load_params())
    clusters = common.read_parquet(common.CLUSTERS_FILE, made_by="assign")
    scores = common.read_parquet(common.SCORES_FILE, made_by="score")
    split = common.read_parquet(common.SPLIT_FILE, made_by="split")
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    near = common.read_parquet(common.NEAR_GROUPS_FILE, made_by="health")
    neighbors = common.read_arrow(common.NEIGHBORS_FILE, "health", ["id", "neighbors"])
    image_patterns = common.read_parquet(
        common.IMAGE_PATTERNS_FILE, made_by="patterns", categories=["id"]
    )
    ids = clusters["id"].tolist()
    thumbs = thumbnails.load(ids)
    table = explorer_table(clusters, scores, split, manifest, near, neighbors, image_patterns)
    summary = collection_summary(manifest, read_rejected_count(), len(table), near)
    _, sha256s, _ = common.read_image_keys(ids)
    clusterings = read_clusterings(CLUSTERINGS_DIR, logger)
    data, kept = build_explorer(
        table, thumbs, summary, params, EXPLORER_DIR, common.COLLECTION_DIR, sha256s, clusterings
    )
    for compared in data["clusterings"]:
        logger.info(
            "compared with %s: %d images in %d clusters; on the %d both cluster, adjusted "
            "Rand index %s, normalized mutual information %s",
            compared["name"],
            compared["images"],
            compared["cluster_count"],
            compared["shared"],
            compared["ari"],
            compared["nmi"],
        )
    logger.info(
        "%d of %d images on the page, %d atlas(es) of %dx%d sprites and %dx%d icons (%d kept "
        "from the last run); open %s; %.1f s",
        data["count"],
        len(table),
        len(data["atlas"]["files"]),
        data["sprite"]["width"],
        data["sprite"]["height"],
        data["atlas"]["icon"]["width"],
        data["atlas"]["icon"]["height"],
        kept,
        EXPLORER_DIR / "index.html",
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
