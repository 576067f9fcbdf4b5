"""posters: compose posters from images of chosen clusters, as the original project did.

Params:  PostersParams below (params.yaml, section posters)
Inputs:  data/processed/scores.parquet (cluster, silhouette), data/raw/manifest.parquet
         (path, blank and duplicate flags), data/processed/near_groups.parquet (which
         images are near-duplicate copies), data/raw/collections/ (the full-size images),
         the templates
Outputs: reports/posters/<template>-NN.jpg (dpi recorded), <template>-preview.png (the
         regions drawn and labeled), posters.csv (poster, template, region, id, ...)

The template format is in stages/poster_templates.py and templates/posters/. Each region
gets one image, cut from the original, scaled with a Lanczos filter and center-cropped to
the region's aspect ratio. No image appears twice on one poster; blank and duplicate
images and near-duplicate copies (only their group's representative is used) are skipped
unless named by id. A poster whose images (by file sha256), template and quality are
those of a poster the last run made is copied from data/cache/posters/.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import PIL
from PIL import Image, ImageDraw, ImageFont, ImageOps
from pydantic import Field, field_validator

from stages import common, images, mosaics, settings
from stages.poster_templates import (
    ClusterFill,
    Fill,
    Region,
    Template,
    TemplateError,
    describe_fill,
    load_templates,
)

STAGE = "posters"
POSTERS_DIR = Path("reports/posters")
POSTERS_TABLE = "posters.csv"
# The last run's posters by key (poster_key): a poster whose images did not change is
# copied, not decoded and drawn again.
POSTER_CACHE_DIR = common.CACHE_DIR / STAGE
PREVIEW_WIDTH = 1200  # px
TEMPLATES_ROOT = Path("templates")  # a dep of the stage as a whole, in dvc.yaml
TEMPLATES_WORDS = f"expected a folder in {TEMPLATES_ROOT}/, such as {TEMPLATES_ROOT}/posters"


class PostersParams(settings.Section):
    """params.yaml, section posters."""

    SECTION: ClassVar[str] = "posters"
    templates: Path = Field(
        Path("templates/posters"),
        description="a folder of YAML templates; each gives `count` posters",
        json_schema_extra={"allowed": TEMPLATES_WORDS},
    )
    count: int = Field(2, ge=1, description="posters per template")
    best_clusters: int = Field(
        5,
        ge=1,
        description="`fill: best` draws from this many clusters of highest mean silhouette "
        "(more when these cannot fill a poster)",
    )
    top_share: float = Field(
        0.5,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="within a cluster, draw from this best-silhouette share first",
    )
    quality: int = Field(92, ge=1, le=95, description="JPEG quality")
    seed: int = Field(
        42, ge=0, description="seed of the choice of images: the same params give the same bytes"
    )

    @field_validator("templates", mode="before")
    @classmethod
    def folder_path(cls, value: Any) -> Any:
        """A relative path inside templates/, given as text (strict mode takes no text for
        a Path).

        dvc.yaml lists templates/ as the stage's dep, so that a missing folder reaches
        the stage, which names this key, instead of stopping DVC with a bare path; a
        folder elsewhere would not be tracked at all.
        """
        if isinstance(value, str) and value.strip():
            value = Path(value)
        if not isinstance(value, Path) or not is_inside(value, TEMPLATES_ROOT):
            raise ValueError(TEMPLATES_WORDS)
        return value


def is_inside(path: Path, folder: Path) -> bool:
    """Whether a relative path is a relative folder or inside it, once `..` is resolved."""
    parts = Path(os.path.normpath(path)).parts
    return not path.is_absolute() and Path(*parts[:1]) == folder


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


def candidates(
    scores: pd.DataFrame,
    manifest: pd.DataFrame,
    best_clusters: int,
    copies: np.ndarray | None = None,
) -> Candidates:
    """Usable images per cluster, highest silhouette first (ties by id), and the clusters
    in order of mean silhouette for `fill: best` (noise never counts).

    Blank and duplicate images are left out, and so are the near-duplicate `copies` (a
    mask in the order of `scores`): a poster shows one image of each group.
    """
    flags = manifest.set_index("id")[["blank", "duplicate"]].reindex(scores["id"])
    unusable = flags["blank"].fillna(False).to_numpy() | flags["duplicate"].fillna(False).to_numpy()
    if copies is not None:
        unusable = unusable | copies
    table = scores[["id", "cluster", "silhouette"]].copy()
    table["usable"] = ~unusable
    table["order"] = table["silhouette"].fillna(-np.inf)
    table = table.sort_values(["order", "id"], ascending=[False, True], kind="stable")
    rank = {image_id: place for place, image_id in enumerate(table["id"].tolist())}
    usable = table[table["usable"]]
    by_cluster = {int(c): group["id"].tolist() for c, group in usable.groupby("cluster", sort=True)}
    means = scores[scores["cluster"] != common.NOISE].groupby("cluster")["silhouette"].mean()
    means = means.fillna(-np.inf)
    best_order = [int(c) for c in sorted(means.index, key=lambda c: (-means[c], c))]
    return Candidates(by_cluster, best_order, best_clusters, rank)


def region_pool(region: Region, template: Template, pool: Candidates) -> list[str]:
    """The ids a region may use, best first; unknown clusters or ids are TemplateErrors."""
    where = f"template {template.name}, region {region.name}"
    if region.fill == "best":
        return pool.best(images_needed=len(template.regions))
    if isinstance(region.fill, ClusterFill):
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
                f"{describe_fill(region.fill)}, which have {len(pools[region.name])} usable "
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
    turned = images.exif_orientation(image) in images.ROTATED_ORIENTATIONS
    image.draft("RGB", (size[1], size[0]) if turned else size)
    upright = ImageOps.exif_transpose(image)
    return ImageOps.fit(
        images.to_rgb(upright), size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5)
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
        label = f"{region.name}\n{region.width}x{region.height}\n{describe_fill(region.fill)}"
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


@functools.cache
def drawing_code_digest() -> bytes:
    """The sha256 of each file of the code that cuts and draws tiles, read once a run."""
    return b"".join(
        hashlib.sha256(code.read_bytes()).digest()
        for code in (Path(__file__), Path(images.__file__))
    )


def poster_key(
    template: Template, chosen: dict[str, str], sha256_of: pd.Series, quality: int
) -> str:
    """What a poster's bytes depend on: its template, the file in each region, the JPEG
    quality and the code that cuts and draws the tiles."""
    digest = hashlib.sha256(template.model_dump_json().encode())
    digest.update(f"{quality}\0{PIL.__version__}\0".encode())
    digest.update(drawing_code_digest())
    for region in template.regions:
        digest.update(f"{region.name}\0{sha256_of[chosen[region.name]]}\n".encode())
    return digest.hexdigest()


def make_posters(
    templates: list[Template],
    scores: pd.DataFrame,
    manifest: pd.DataFrame,
    params: PostersParams,
    collection_dir: Path,
    directory: Path,
    copies: np.ndarray | None = None,
    cache: Path = POSTER_CACHE_DIR,
) -> tuple[pd.DataFrame, int]:
    """Render every template's posters and previews into `directory` (replaced as a whole).

    Returns the table of which image sits where, and how many posters were copied from
    the last run's (kept in `cache` by poster_key). An image that fails to decode is
    logged and replaced by the region's next choice; near-duplicate `copies` are not used.
    """
    pool = candidates(scores, manifest, params.best_clusters, copies)
    paths = manifest.set_index("id")["path"]
    sha256_of = manifest.set_index("id")["sha256"]
    keys: dict[str, str] = {}
    kept = 0
    cluster_of = scores.set_index("id")["cluster"]
    silhouette_of = scores.set_index("id")["silhouette"]
    rows = []
    with common.replace_folder(directory) as staging:
        for template in templates:
            preview(template).save(staging / f"{template.name}-preview.png", format="PNG")
            for index in range(1, params.count + 1):
                poster = f"{template.name}-{index:02d}.jpg"
                # The first choice (poster_tiles makes it again if an image fails to decode).
                rng = poster_rng(params.seed, template.name, index)
                chosen = choose_images(template, pool, params.top_share, rng, frozenset())
                key = poster_key(template, chosen, sha256_of, params.quality)
                earlier = mosaics.kept_mosaics({poster: key}, cache, ".jpg")
                if earlier:
                    shutil.copyfile(earlier[poster], staging / poster)
                    kept += 1
                else:
                    chosen, tiles = poster_tiles(
                        template, pool, params, index, paths, collection_dir
                    )
                    key = poster_key(template, chosen, sha256_of, params.quality)
                    render_poster(template, tiles).save(
                        staging / poster,
                        format="JPEG",
                        quality=params.quality,
                        dpi=(template.dpi, template.dpi),
                        optimize=True,
                    )
                keys[poster] = key
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
        mosaics.keep_mosaics({name: staging / name for name in keys}, keys, cache, ".jpg")
    return table, kept


def main() -> None:
    """Read params, templates, scores and the manifest; write reports/posters/."""
    started = time.perf_counter()
    logger = common.get_logger(STAGE)
    params = PostersParams.from_params(settings.load_params())
    templates = load_templates(params.templates)
    scores = common.read_parquet(common.SCORES_FILE, made_by="score")
    manifest = common.read_parquet(common.MANIFEST_FILE, made_by="sync")
    copies = common.read_near_copies(scores["id"].tolist())
    table, kept = make_posters(
        templates, scores, manifest, params, common.COLLECTION_DIR, POSTERS_DIR, copies
    )
    logger.info(
        "%d posters from %d template(s) (%s), %d tiles, in %s (%d kept from the last run); %.1f s",
        table["poster"].nunique(),
        len(templates),
        ", ".join(t.name for t in templates),
        len(table),
        POSTERS_DIR,
        kept,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    common.run_stage(main)
