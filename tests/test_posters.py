"""The posters stage: templates, the choice of images, tiles and reproducible JPEGs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, image_bytes, pattern_image, write
from PIL import Image

from stages import common, poster_templates, posters

PARAMS = posters.PostersParams(
    templates=Path("templates/unused"), count=2, best_clusters=2, top_share=0.5, quality=90, seed=7
)
SMALL_TEMPLATE = {
    "width": 400,
    "height": 300,
    "dpi": 200,
    "background": "#102030",
    "regions": [
        {"name": "hero", "x": 10, "y": 10, "width": 380, "height": 160, "fill": "best"},
        {"name": "a", "x": 10, "y": 180, "width": 120, "height": 110, "fill": {"clusters": [0]}},
        {"name": "b", "x": 140, "y": 180, "width": 120, "height": 110, "fill": {"clusters": [1]}},
        {"name": "c", "x": 270, "y": 180, "width": 120, "height": 110, "fill": {"ids": ["img-05"]}},
    ],
}


def box(name: str, **changes: object) -> dict:
    """A region of 10 x 10 px at the origin, with changes; a None value drops the key."""
    region = {"name": name, "x": 0, "y": 0, "width": 10, "height": 10, "fill": "best", **changes}
    return {key: value for key, value in region.items() if value is not None}


def template(document: dict, name: str = "small") -> posters.Template:
    return poster_templates.parse_template(document, f"{name}.yaml", name)


@pytest.fixture
def collection(tmp_path: Path) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """24 originals of mixed sizes in 3 clusters: scores and manifest tables to match."""
    folder = tmp_path / "collections"
    ids, paths, clusters, silhouettes = [], [], [], []
    for index in range(24):
        image_id = f"img-{index:02d}"
        size = (320, 180) if index % 2 else (150, 260)
        path = f"{image_id}.jpg"
        write(folder / path, image_bytes(pattern_image(*size, seed=index), "JPEG", quality=90))
        ids.append(image_id)
        paths.append(path)
        clusters.append(index % 3)
        silhouettes.append(round(0.9 - 0.03 * index, 3))
    scores = pd.DataFrame({"id": ids, "cluster": clusters, "silhouette": silhouettes})
    manifest = pd.DataFrame(
        {"id": ids, "path": paths, "blank": [False] * 24, "duplicate": [False] * 24}
    )
    manifest["sha256"] = [digest(folder / path) for path in paths]
    return folder, scores, manifest


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(collection: tuple, out: Path, params: posters.PostersParams = PARAMS) -> pd.DataFrame:
    """Posters of the small template into `out`, each drawn (no earlier run's kept)."""
    folder, scores, manifest = collection
    table, kept = posters.make_posters(
        [template(SMALL_TEMPLATE)], scores, manifest, params, folder, out, None, out / "cache"
    )
    assert kept == 0
    return table


def test_a_poster_whose_images_did_not_change_is_copied_not_drawn(
    collection: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, scores, manifest = collection
    small = [template(SMALL_TEMPLATE)]
    cache = tmp_path / "cache"
    first, kept = posters.make_posters(
        small, scores, manifest, PARAMS, folder, tmp_path / "a", None, cache
    )
    drawn = {name: digest(tmp_path / "a" / name) for name in ("small-01.jpg", "small-02.jpg")}
    assert kept == 0 and len(list(cache.iterdir())) == 2

    def no_drawing(*_: object) -> None:
        raise AssertionError("a kept poster is not drawn again")

    monkeypatch.setattr(posters, "poster_tiles", no_drawing)
    again, kept = posters.make_posters(
        small, scores, manifest, PARAMS, folder, tmp_path / "b", None, cache
    )
    assert kept == 2 and again.equals(first)
    assert {name: digest(tmp_path / "b" / name) for name in drawn} == drawn
    monkeypatch.undo()
    # Another file behind a chosen id: that poster is drawn again, the other kept.
    on = {name: set(first.loc[first["poster"] == name, "id"]) for name in drawn}
    chosen = sorted(on["small-01.jpg"] - on["small-02.jpg"])[0]
    changed = manifest.copy()
    changed.loc[changed["id"] == chosen, "sha256"] = "0" * 64
    _, kept = posters.make_posters(
        small, scores, changed, PARAMS, folder, tmp_path / "c", None, cache
    )
    assert kept == 1 and len(list(cache.iterdir())) == 2, "only this run's posters are kept"


def test_same_seed_same_bytes_other_seed_other_posters(collection: tuple, tmp_path: Path) -> None:
    first = make(collection, tmp_path / "one")
    make(collection, tmp_path / "two")
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["posters.csv", "small-01.jpg", "small-02.jpg", "small-preview.png"]
    for name in names:
        assert digest(tmp_path / "one" / name) == digest(tmp_path / "two" / name), name
    other = make(collection, tmp_path / "three", PARAMS.model_copy(update={"seed": 8}))
    assert digest(tmp_path / "one/small-01.jpg") != digest(tmp_path / "three/small-01.jpg")
    assert first["id"].tolist() != other["id"].tolist()


def test_no_image_repeats_on_a_poster_and_fills_are_honoured(
    collection: tuple, tmp_path: Path
) -> None:
    _, scores, _ = collection
    table = make(collection, tmp_path / "out", PARAMS.model_copy(update={"count": 6}))
    assert table["poster"].nunique() == 6
    for _, poster in table.groupby("poster"):
        assert poster["id"].is_unique and len(poster) == 4
    by_region = table.set_index(["poster", "region"])
    assert (by_region.xs("a", level="region")["cluster"] == 0).all()
    assert (by_region.xs("b", level="region")["cluster"] == 1).all()
    assert (by_region.xs("c", level="region")["id"] == "img-05").all()
    # best = the 2 clusters of highest mean silhouette; here 0 and 1.
    assert set(by_region.xs("hero", level="region")["cluster"]) <= {0, 1}
    # Within a cluster, the top half by silhouette is drawn from first.
    top_of_cluster_0 = scores[scores["cluster"] == 0].nlargest(4, "silhouette")["id"]
    assert set(by_region.xs("a", level="region")["id"]) <= set(top_of_cluster_0)


def test_best_takes_more_clusters_when_the_best_few_cannot_fill_the_poster(
    collection: tuple,
) -> None:
    _, scores, manifest = collection
    regions = [box(f"r{i}", x=20 * i) for i in range(12)]  # 12 regions; a cluster has 8
    pool = posters.candidates(scores, manifest, best_clusters=1)
    chosen = posters.choose_images(
        template({"width": 240, "height": 10, "regions": regions}),
        pool,
        1.0,
        np.random.default_rng(0),
    )
    assert len(set(chosen.values())) == 12
    assert set(scores.set_index("id").loc[list(chosen.values()), "cluster"]) == {0, 1}
    assert len(pool.best(images_needed=1)) == 8  # one cluster is enough for one region


def test_blank_and_duplicate_images_are_never_chosen(collection: tuple, tmp_path: Path) -> None:
    folder, scores, manifest = collection
    manifest = manifest.copy()
    skipped = {"img-00", "img-03", "img-01"}  # the best of clusters 0 and 1
    manifest.loc[manifest["id"].isin(skipped), "blank"] = True
    manifest.loc[manifest["id"] == "img-04", "duplicate"] = True
    skipped.add("img-04")
    table = make(
        (folder, scores, manifest), tmp_path / "out", PARAMS.model_copy(update={"count": 8})
    )
    assert not set(table["id"]) & skipped


def test_near_duplicate_copies_are_never_chosen_but_their_representative_is(
    collection: tuple, tmp_path: Path
) -> None:
    folder, scores, manifest = collection
    # img-00, 03 and 06 (the best of cluster 0) are copies of img-09 in one group
    copies = scores["id"].isin(["img-00", "img-03", "img-06"]).to_numpy()
    params = PARAMS.model_copy(update={"count": 8})
    table, _ = posters.make_posters(
        [template(SMALL_TEMPLATE)],
        scores,
        manifest,
        params,
        folder,
        tmp_path / "out",
        copies,
        tmp_path / "cache",
    )
    assert not set(table["id"]) & {"img-00", "img-03", "img-06"}
    assert "img-09" in set(table["id"])
    without = make(collection, tmp_path / "all", params)
    assert set(without["id"]) & {"img-00", "img-03", "img-06"}


def test_the_jpeg_records_the_dpi_and_the_canvas_size(collection: tuple, tmp_path: Path) -> None:
    make(collection, tmp_path / "out")
    with Image.open(tmp_path / "out/small-01.jpg") as poster:
        assert poster.format == "JPEG"
        assert poster.size == (400, 300)
        assert poster.info["dpi"] == (200, 200)
        # The gutter shows the background color.
        assert np.abs(np.asarray(poster)[2, 200].astype(int) - (16, 32, 48)).max() < 12


def test_tiles_are_center_cropped_never_squashed(tmp_path: Path) -> None:
    stripes = np.zeros((100, 200, 3), dtype=np.uint8)
    stripes[:, :50] = (0, 255, 0)
    stripes[:, 50:150] = (255, 0, 0)
    stripes[:, 150:] = (0, 0, 255)
    path = write(tmp_path / "stripes.png", image_bytes(Image.fromarray(stripes), "PNG"))
    tile = np.asarray(posters.tile(path, (60, 60))).astype(int)
    assert tile.shape == (60, 60, 3)
    assert (tile[:, :, 0] > 200).all() and (tile[:, :, 1:] < 40).all()  # red only


def test_an_unreadable_original_is_skipped_and_reported(
    collection: tuple, tmp_path: Path, logged: pytest.LogCaptureFixture
) -> None:
    folder = collection[0]
    (folder / "img-00.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    table = make(collection, tmp_path / "out", PARAMS.model_copy(update={"count": 4}))
    assert "img-00" not in set(table["id"])
    # through caplog: the stage's logger prints to the stderr of when it was first made
    assert "skipped an unreadable image" in logged.text
    assert len(table) == 16


def test_a_missing_cluster_names_the_template_and_region(collection: tuple) -> None:
    _, scores, manifest = collection
    document = {
        **SMALL_TEMPLATE,
        "regions": [{**SMALL_TEMPLATE["regions"][1], "fill": {"clusters": [9]}}],
    }
    pool = posters.candidates(scores, manifest, 2)
    with pytest.raises(posters.TemplateError, match="template small, region a: cluster 9 does not"):
        posters.choose_images(template(document), pool, 0.5, np.random.default_rng(0))


def test_asking_more_images_than_a_cluster_has_names_the_template_and_region(
    collection: tuple,
) -> None:
    _, scores, manifest = collection
    regions = [
        {"name": f"r{i}", "x": 40 * i, "y": 0, "width": 30, "height": 30, "fill": {"clusters": [2]}}
        for i in range(9)  # cluster 2 has 8 images
    ]
    document = {"width": 400, "height": 40, "regions": regions}
    pool = posters.candidates(scores, manifest, 2)
    with pytest.raises(posters.TemplateError, match=r"template small, region r\d.*8 usable"):
        posters.choose_images(template(document), pool, 0.5, np.random.default_rng(0))


def test_an_unknown_id_names_the_template_and_region(collection: tuple) -> None:
    _, scores, manifest = collection
    region = {**SMALL_TEMPLATE["regions"][3], "fill": {"ids": ["nope"]}}
    pool = posters.candidates(scores, manifest, 2)
    with pytest.raises(posters.TemplateError, match="region c: image id 'nope' is not"):
        posters.choose_images(
            template({**SMALL_TEMPLATE, "regions": [region]}), pool, 0.5, np.random.default_rng(0)
        )


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"width": 0}, "small.yaml: width = 0"),
        ({"background": "not-a-color"}, "background = 'not-a-color'"),
        ({"colour": "red"}, "unknown keys \\['colour'\\]"),
        ({"regions": []}, "regions = \\[\\]: expected a list"),
        ({"regions": [box("big", x=300, width=200)]}, "region big: the box .* reaches outside"),
        ({"regions": [box("r", fill="worst")]}, "region r: fill = 'worst'"),
        ({"regions": [box("r", height=None)]}, "region r: missing \\['height'\\]"),
        ({"regions": [SMALL_TEMPLATE["regions"][0], {**SMALL_TEMPLATE["regions"][0], "name": "z"}]},
         "region z: overlaps region hero"),
    ],
)  # fmt: skip
def test_a_bad_template_gives_one_line_naming_it(change: dict, words: str) -> None:
    with pytest.raises(posters.TemplateError, match=words):
        template({**SMALL_TEMPLATE, **change})


def test_templates_load_from_a_folder_with_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(common.UserError, match="no such folder"):
        posters.load_templates(tmp_path / "missing")
    with pytest.raises(common.UserError, match=r"has no \*\.yaml poster templates"):
        posters.load_templates(tmp_path)
    (tmp_path / "broken.yaml").write_text("width: [1, 2\n")
    with pytest.raises(posters.TemplateError, match=r"broken\.yaml: not valid YAML"):
        posters.load_templates(tmp_path)
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(SMALL_TEMPLATE))
    assert [t.name for t in posters.load_templates(tmp_path)] == ["broken"]


def test_the_shipped_templates_have_the_promised_geometry() -> None:
    templates = {t.name: t for t in posters.load_templates(REPO_ROOT / "templates/posters")}
    landscape = templates["landscape"]
    assert (landscape.width, landscape.height, landscape.background) == (4410, 2970, (0, 0, 0))
    sizes = sorted((r.width, r.height) for r in landscape.regions)
    assert sizes == [(1065, 705)] * 8 + [(2160, 1440)] * 2
    lefts = sorted({r.x for r in landscape.regions})
    assert lefts == [30, 1125, 2220, 3315]  # 30 px gutters everywhere
    assert max(r.box[2] for r in landscape.regions) == 4410 - 30
    assert max(r.box[3] for r in landscape.regions) == 2970 - 30

    portrait = templates["portrait"]
    assert (portrait.width, portrait.height, portrait.dpi) == (2880, 4320, 150)
    assert min(r.x for r in portrait.regions) == min(r.y for r in portrait.regions) == 60
    assert max(r.box[2] for r in portrait.regions) == 2880 - 60
    assert max(r.box[3] for r in portrait.regions) == 4320 - 60


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("count", 0, "posters.count = 0"),
        ("top_share", 0, "posters.top_share = 0"),
        ("quality", 101, "posters.quality = 101"),
        ("templates", "", "posters.templates = ''"),
        ("templates", "/srv/posters", "expected a folder in templates/"),
        ("templates", "templates/../../posters", "expected a folder in templates/"),
        ("templates", "posters", "expected a folder in templates/"),
    ],
)
def test_bad_params_name_the_key(key: str, value: object, words: str) -> None:
    section = {
        "templates": "templates/posters",
        "count": 2,
        "best_clusters": 5,
        "top_share": 0.5,
        "quality": 92,
        "seed": 42,
    }
    section[key] = value
    with pytest.raises(common.UserError, match=re.escape(words)):
        posters.PostersParams.from_params({"posters": section})


@pytest.mark.parametrize("folder", ["templates/posters", "templates", "templates/mine/../a4"])
def test_a_templates_folder_inside_templates_is_accepted(folder: str) -> None:
    section = {"templates": folder, "count": 2, "best_clusters": 5, "top_share": 0.5}
    chosen = posters.PostersParams.from_params({"posters": {**section, "quality": 92, "seed": 1}})
    assert chosen.templates == Path(folder)
