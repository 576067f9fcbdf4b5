"""posters: compose posters from images of chosen clusters, as the original project did.

Params (params.yaml):
  posters.templates      a folder of YAML templates; each gives `count` posters
  posters.count          posters per template
  posters.best_clusters  `fill: best` draws from this many clusters of highest mean silhouette
  posters.top_share      within a cluster, draw from this best-silhouette share first
  posters.quality        JPEG quality
  posters.seed           seeds the choice of images: the same params give the same bytes
Inputs:  data/processed/scores.parquet (cluster, silhouette), data/raw/manifest.parquet
         (path, blank and duplicate flags), data/raw/collections/ (the full-size images),
         the templates
Outputs: reports/posters/<template>-NN.jpg (dpi recorded), <template>-preview.png (the
         regions drawn and labeled), posters.csv (poster, template, region, id, ...)

A template (YAML):
  width: 4410            # canvas, px
  height: 2970
  dpi: 300               # recorded in the JPEG
  background: "#000000"  # the canvas color, which shows in the gutters and border
  regions:
    - {name: left, x: 30, y: 30, width: 2160, height: 1440, fill: best}
    - {name: a, x: 30, y: 1500, width: 1065, height: 705, fill: {clusters: [0, 3]}}
    - {name: b, x: 1125, y: 1500, width: 1065, height: 705, fill: {ids: [20170512-103200]}}
Each region gets one image, cut from the original, scaled with a Lanczos filter and
center-cropped to the region's aspect ratio. No image appears twice on one poster; blank
and duplicate images are skipped unless named by id.
"""

from __future__ import annotations

import itertools
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageColor, ImageDraw, ImageFont, ImageOps

from stages import common

STAGE = "posters"
SCORES_FILE = common.PROCESSED_DIR / "scores.parquet"
POSTERS_DIR = Path("reports/posters")
POSTERS_TABLE = "posters.csv"
MAX_CANVAS_SIDE = 30000  # px; beyond this a poster is a mistake, not a print
PREVIEW_WIDTH = 1200  # px
TEMPLATE_KEYS = {"width", "height", "dpi", "background", "regions"}
REGION_KEYS = {"name", "x", "y", "width", "height", "fill"}
NOISE = -1


@dataclass(frozen=True)
class PostersParams:
    """The posters section of params.yaml, checked."""

    templates: Path
    count: int
    best_clusters: int
    top_share: float
    quality: int
    seed: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PostersParams:
        """Read and check every posters param."""
        folder = common.get_param(params, "posters.templates")
        if not isinstance(folder, str) or not folder.strip():
            raise common.param_error("posters.templates", folder, "expected a folder of templates")
        share = common.number_param(params, "posters.top_share", minimum=0.0)
        if not 0.0 < share <= 1.0:
            raise common.param_error("posters.top_share", share, "expected a share in (0, 1]")
        return cls(
            templates=Path(folder),
            count=common.int_param(params, "posters.count", minimum=1),
            best_clusters=common.int_param(params, "posters.best_clusters", minimum=1),
            top_share=share,
            quality=common.int_param(params, "posters.quality", minimum=1, maximum=95),
            seed=common.int_param(params, "posters.seed", minimum=0),
        )


@dataclass(frozen=True)
class Fill:
    """What fills a region: `best` clusters, a list of `clusters`, or fixed image `ids`."""

    kind: str
    clusters: tuple[int, ...] = ()
    ids: tuple[str, ...] = ()

    def describe(self) -> str:
        """A short label, for the preview and errors."""
        if self.kind == "best":
            return "best clusters"
        if self.kind == "clusters":
            return "clusters " + ", ".join(map(str, self.clusters))
        return "ids " + ", ".join(self.ids)


@dataclass(frozen=True)
class Region:
    """A tile of a poster: its box in px and what fills it."""

    name: str
    x: int
    y: int
    width: int
    height: int
    fill: Fill

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom)."""
        return self.x, self.y, self.x + self.width, self.y + self.height


@dataclass(frozen=True)
class Template:
    """A poster layout, read from a YAML file."""

    name: str
    width: int
    height: int
    dpi: int
    background: tuple[int, int, int]
    regions: tuple[Region, ...]


# ----------------------------------------------------------------------------- templates


class TemplateError(common.UserError):
    """A template that cannot be used; the message names the file and the region."""


def _positive_int(value: Any, where: str, key: str, maximum: int = MAX_CANVAS_SIDE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise TemplateError(f"{where}: {key} = {value!r}: expected an integer 1 to {maximum}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_fill(value: Any, where: str) -> Fill:
    """`best`, {clusters: [...]} or {ids: [...]}, checked."""
    if value == "best":
        return Fill("best")
    if isinstance(value, dict) and len(value) == 1:
        (key, items), *_ = value.items()
        items = items if isinstance(items, list) else []
        if key == "clusters" and items and all(_is_int(c) for c in items):
            return Fill("clusters", clusters=tuple(items))
        if key == "ids" and items:
            return Fill("ids", ids=tuple(str(i) for i in items))
    raise TemplateError(
        f"{where}: fill = {value!r}: expected best, {{clusters: [0, 3]}} or {{ids: [an-id]}}"
    )


def parse_region(value: Any, index: int, source: str, canvas: tuple[int, int]) -> Region:
    """One region of a template, checked to be whole and inside the canvas."""
    where = f"{source}, region {index + 1}"
    if not isinstance(value, dict):
        raise TemplateError(f"{where}: expected a mapping with {sorted(REGION_KEYS)}")
    name = str(value.get("name", index + 1))
    where = f"{source}, region {name}"
    unknown = set(value) - REGION_KEYS
    missing = REGION_KEYS - {"name"} - set(value)
    if unknown or missing:
        problem = f"unknown keys {sorted(unknown)}" if unknown else f"missing {sorted(missing)}"
        raise TemplateError(f"{where}: {problem}; a region has {sorted(REGION_KEYS)}")
    for key in ("x", "y"):
        coordinate = value[key]
        if isinstance(coordinate, bool) or not isinstance(coordinate, int) or coordinate < 0:
            raise TemplateError(f"{where}: {key} = {coordinate!r}: expected an integer >= 0")
    region = Region(
        name=name,
        x=value["x"],
        y=value["y"],
        width=_positive_int(value["width"], where, "width"),
        height=_positive_int(value["height"], where, "height"),
        fill=parse_fill(value["fill"], where),
    )
    if region.box[2] > canvas[0] or region.box[3] > canvas[1]:
        raise TemplateError(
            f"{where}: the box {region.box} reaches outside the {canvas[0]}x{canvas[1]} canvas"
        )
    return region


def overlapping(first: Region, second: Region) -> bool:
    """Whether two regions share any pixel."""
    a, b = first.box, second.box
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def parse_template(document: Any, source: str, name: str) -> Template:
    """A template from its parsed YAML; every mistake is a TemplateError naming `source`."""
    if not isinstance(document, dict):
        raise TemplateError(f"{source}: expected a mapping with {sorted(TEMPLATE_KEYS)}")
    unknown = set(document) - TEMPLATE_KEYS
    missing = TEMPLATE_KEYS - {"dpi", "background"} - set(document)
    if unknown or missing:
        problem = f"unknown keys {sorted(unknown)}" if unknown else f"missing {sorted(missing)}"
        raise TemplateError(f"{source}: {problem}; a template has {sorted(TEMPLATE_KEYS)}")
    width = _positive_int(document["width"], source, "width")
    height = _positive_int(document["height"], source, "height")
    dpi = _positive_int(document.get("dpi", 300), source, "dpi", maximum=4800)
    color = document.get("background", "#000000")
    try:
        background = ImageColor.getrgb(str(color))[:3]
    except ValueError:
        raise TemplateError(
            f"{source}: background = {color!r}: expected a color such as '#000000' or 'white'"
        ) from None
    regions = document["regions"]
    if not isinstance(regions, list) or not regions:
        raise TemplateError(f"{source}: regions: expected a list of at least one region")
    parsed = tuple(
        parse_region(value, index, source, (width, height)) for index, value in enumerate(regions)
    )
    for index, first in enumerate(parsed):
        for second in parsed[index + 1 :]:
            if first.name == second.name:
                raise TemplateError(f"{source}: two regions are named {first.name!r}")
            if overlapping(first, second):
                raise TemplateError(f"{source}, region {second.name}: overlaps region {first.name}")
    return Template(name, width, height, dpi, background, parsed)


def load_templates(folder: Path) -> list[Template]:
    """Every *.yaml template of a folder, by file name."""
    if not folder.is_dir():
        raise common.UserError(f"posters.templates = {str(folder)!r}: no such folder")
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not files:
        raise common.UserError(f"{folder} has no *.yaml poster templates")
    templates = []
    for path in files:
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise TemplateError(f"{path}: not valid YAML ({error})") from None
        templates.append(parse_template(document, str(path), path.stem))
    return templates


# ----------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class Candidates:
    """The images posters may use, and their order of preference."""

    by_cluster: dict[int, list[str]]  # usable ids of each cluster, best first
    best_order: list[int]  # clusters by mean silhouette, highest first (noise left out)
    best_clusters: int  # how many of them `fill: best` draws from, at the least
    rank: dict[str, int]  # every id's place in the order of preference (0 = best)

    def best(self, images_needed: int) -> list[str]:
        """The usable ids of the best clusters, best first: `best_clusters` clusters, or
        more where those few cannot fill `images_needed` regions on their own."""
        chosen: list[int] = []
        images = 0
        for cluster in self.best_order:
            if len(chosen) >= self.best_clusters and images >= images_needed:
                break
            chosen.append(cluster)
            images += len(self.by_cluster.get(cluster, []))
        ids = [i for c in chosen for i in self.by_cluster.get(c, [])]
        return sorted(ids, key=self.rank.__getitem__)


def candidates(scores: pd.DataFrame, manifest: pd.DataFrame, best_clusters: int) -> Candidates:
    """Usable images per cluster, highest silhouette first (ties by id), and the clusters
    in order of mean silhouette for `fill: best` (noise never counts).

    Blank and duplicate images are left out.
    """
    flags = manifest.set_index("id")[["blank", "duplicate"]].reindex(scores["id"])
    unusable = flags["blank"].fillna(False).to_numpy() | flags["duplicate"].fillna(False).to_numpy()
    table = scores[["id", "cluster", "silhouette"]].copy()
    table["usable"] = ~unusable
    table["order"] = table["silhouette"].fillna(-np.inf)
    table = table.sort_values(["order", "id"], ascending=[False, True], kind="stable")
    rank = {image_id: place for place, image_id in enumerate(table["id"])}
    usable = table[table["usable"]]
    by_cluster = {int(c): group["id"].tolist() for c, group in usable.groupby("cluster", sort=True)}
    means = scores[scores["cluster"] != NOISE].groupby("cluster")["silhouette"].mean()
    means = means.fillna(-np.inf)
    best_order = [int(c) for c in sorted(means.index, key=lambda c: (-means[c], c))]
    return Candidates(by_cluster, best_order, best_clusters, rank)


def region_pool(region: Region, template: Template, pool: Candidates) -> list[str]:
    """The ids a region may use, best first; unknown clusters or ids are TemplateErrors."""
    where = f"template {template.name}, region {region.name}"
    if region.fill.kind == "best":
        return pool.best(images_needed=len(template.regions))
    if region.fill.kind == "clusters":
        missing = [c for c in region.fill.clusters if c not in pool.by_cluster]
        if missing:
            existing = ", ".join(map(str, sorted(pool.by_cluster))) or "none"
            raise TemplateError(
                f"{where}: cluster {missing[0]} does not exist or has no usable image "
                f"(clusters with images: {existing})"
            )
        merged = {i for c in region.fill.clusters for i in pool.by_cluster[c]}
        return sorted(merged, key=pool.rank.__getitem__)
    unknown = [i for i in region.fill.ids if i not in pool.rank]
    if unknown:
        raise TemplateError(f"{where}: image id {unknown[0]!r} is not in the collection")
    return list(dict.fromkeys(region.fill.ids))


def choose_images(
    template: Template,
    pool: Candidates,
    top_share: float,
    rng: np.random.Generator,
    exclude: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """One image per region (region name -> id), none twice, none in `exclude`.

    Regions with the fewest candidates choose first, so a small cluster is not used up by
    a region that could have taken something else. Each region draws at random among its
    best unused candidates: the top `top_share` of its pool, at least one.
    """
    pool_of_fill: dict[Fill, list[str]] = {}  # regions that fill alike share one pool
    for region in template.regions:
        if region.fill not in pool_of_fill:
            pool_of_fill[region.fill] = region_pool(region, template, pool)
    pools = {region.name: pool_of_fill[region.fill] for region in template.regions}
    order = sorted(template.regions, key=lambda region: (len(pools[region.name]), region.name))
    used: set[str] = set(exclude)
    chosen: dict[str, str] = {}
    for region in order:
        window = max(1, math.ceil(top_share * len(pools[region.name])))
        # Only the first `window` unused candidates can be drawn: stop scanning there.
        unused = (i for i in pools[region.name] if i not in used)
        candidates_left = list(itertools.islice(unused, window))
        if not candidates_left:
            raise TemplateError(
                f"template {template.name}, region {region.name} asks for an image of "
                f"{region.fill.describe()}, which have {len(pools[region.name])} usable "
                "image(s), all taken by other regions of the poster: ask for fewer images "
                "of them, or more clusters"
            )
        choice = candidates_left[int(rng.integers(len(candidates_left)))]
        chosen[region.name] = choice
        used.add(choice)
    return chosen


def poster_rng(seed: int, template: str, index: int) -> np.random.Generator:
    """The random stream of one poster: depends on the seed, template name and number only."""
    return np.random.default_rng([seed, zlib.crc32(template.encode("utf-8")), index])


# ----------------------------------------------------------------------------- drawing


class UnreadableImageError(Exception):
    """An original that fails to decode; the poster takes another image."""


def tile(path: Path, size: tuple[int, int]) -> Image.Image:
    """An original image, upright, scaled (Lanczos) and center-cropped to `size`."""
    try:
        with Image.open(path) as image:
            return _fitted(image, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"{path}: {error}") from None


def _fitted(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    # JPEG: decode at the smallest DCT scale that still covers the tile, upright or turned.
    turned = common.exif_orientation(image) in common.ROTATED_ORIENTATIONS
    image.draft("RGB", (size[1], size[0]) if turned else size)
    upright = ImageOps.exif_transpose(image)
    return ImageOps.fit(
        common.to_rgb(upright), size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5)
    )


def render_poster(template: Template, tiles: dict[str, Image.Image]) -> Image.Image:
    """The poster canvas with each region's tile pasted in place."""
    canvas = Image.new("RGB", (template.width, template.height), template.background)
    for region in template.regions:
        canvas.paste(tiles[region.name], (region.x, region.y))
    return canvas


def preview(template: Template) -> Image.Image:
    """The template's layout at PREVIEW_WIDTH: regions drawn, named, and their fill."""
    scale = min(1.0, PREVIEW_WIDTH / template.width)
    size = (max(1, round(template.width * scale)), max(1, round(template.height * scale)))
    image = Image.new("RGB", size, template.background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, round(18 * max(scale, 0.5))))
    for region in template.regions:
        box = tuple(round(v * scale) for v in region.box)
        draw.rectangle(box, fill=(60, 64, 72), outline=(255, 204, 51), width=2)
        label = f"{region.name}\n{region.width}x{region.height}\n{region.fill.describe()}"
        draw.multiline_text((box[0] + 6, box[1] + 4), label, fill=(240, 240, 240), font=font)
    return image


# ----------------------------------------------------------------------------- main


def poster_tiles(
    template: Template,
    pool: Candidates,
    params: PostersParams,
    index: int,
    paths: pd.Series,
    collection_dir: Path,
) -> tuple[dict[str, str], dict[str, Image.Image]]:
    """The images chosen for poster `index` of a template, and their tiles.

    An original that fails to decode is reported and left out, and the choice is made
    again without it (from the same seed, so the result is still reproducible).
    """
    broken: set[str] = set()
    while True:
        rng = poster_rng(params.seed, template.name, index)
        chosen = choose_images(template, pool, params.top_share, rng, frozenset(broken))
        tiles: dict[str, Image.Image] = {}
        for region in template.regions:
            image_id = chosen[region.name]
            try:
                tiles[region.name] = tile(
                    collection_dir / paths[image_id], (region.width, region.height)
                )
            except UnreadableImageError as error:
                common.get_logger(STAGE).warning("skipped an unreadable image: %s", error)
                broken.add(image_id)
                break
        else:
            return chosen, tiles


def make_posters(
    templates: list[Template],
    scores: pd.DataFrame,
    manifest: pd.DataFrame,
    params: PostersParams,
    collection_dir: Path,
    directory: Path,
) -> pd.DataFrame:
    """Render every template's posters and previews into `directory` (replaced as a whole).

    Returns the table of which image sits where. An image that fails to decode is logged
    and replaced by the region's next choice.
    """
    pool = candidates(scores, manifest, params.best_clusters)
    paths = manifest.set_index("id")["path"]
    cluster_of = scores.set_index("id")["cluster"]
    silhouette_of = scores.set_index("id")["silhouette"]
    rows = []
    with common.replace_folder(directory) as staging:
        for template in templates:
            preview(template).save(staging / f"{template.name}-preview.png", format="PNG")
            for index in range(1, params.count + 1):
                chosen, tiles = poster_tiles(template, pool, params, index, paths, collection_dir)
                poster = f"{template.name}-{index:02d}.jpg"
                render_poster(template, tiles).save(
                    staging / poster,
                    format="JPEG",
                    quality=params.quality,
                    dpi=(template.dpi, template.dpi),
                    optimize=True,
                )
                for region in template.regions:
                    image_id = chosen[region.name]
                    rows.append(
                        {
                            "poster": poster,
                            "template": template.name,
                            "region": region.name,
                            "id": image_id,
                            "cluster": int(cluster_of[image_id]),
                            "silhouette": silhouette_of[image_id],
                            "path": paths[image_id],
                        }
                    )
        table = pd.DataFrame(rows)
        table.to_csv(staging / POSTERS_TABLE, index=False, float_format="%.6g")
    return table


def main() -> None:
    """Read params, templates, scores and the manifest; write reports/posters/."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = PostersParams.from_params(common.load_params())
    templates = load_templates(params.templates)
    scores = common.read_parquet(SCORES_FILE, made_by="score")
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    table = make_posters(templates, scores, manifest, params, common.COLLECTION_DIR, POSTERS_DIR)
    logger.info(
        "%d posters from %d template(s) (%s), %d tiles, in %s; %.1f s",
        table["poster"].nunique(),
        len(templates),
        ", ".join(t.name for t in templates),
        len(table),
        POSTERS_DIR,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
