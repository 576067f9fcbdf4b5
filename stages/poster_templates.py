"""Poster templates: the YAML schema (pydantic models) and loading a folder of them.

A template (YAML):
  width: 4410            # canvas, px
  height: 2970
  dpi: 300               # recorded in the JPEG
  background: "#000000"  # the canvas color, which shows in the gutters and border
  regions:
    - {name: left, x: 30, y: 30, width: 2160, height: 1440, fill: best}
    - {name: a, x: 30, y: 1500, width: 1065, height: 705, fill: {clusters: [0, 3]}}
    - {name: b, x: 1125, y: 1500, width: 1065, height: 705, fill: {ids: [20170512-103200]}}

Every mistake is one line naming the file and the region, such as
`landscape.yaml, region a: width = 0: expected an integer in [1, 30000]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from PIL import ImageColor
from pydantic import Field, ValidationError, field_validator

from stages import common, settings

MAX_CANVAS_SIDE = 30000  # px; beyond this a poster is a mistake, not a print
CanvasSide = Annotated[int, Field(ge=1, le=MAX_CANVAS_SIDE)]
FILL_WORDS = "expected best, {clusters: [0, 3]} or {ids: [an-id]}"


class TemplateError(common.UserError):
    """A template that cannot be used; the message names the file and the region."""


def as_tuple(value: Any) -> Any:
    """YAML gives lists; the models keep tuples, so that fills can key a dict."""
    return tuple(value) if isinstance(value, list) else value


class ClusterFill(settings.Section):
    """Draw from these clusters."""

    clusters: Annotated[tuple[int, ...], Field(min_length=1)]
    _tuple = field_validator("clusters", mode="before")(as_tuple)


class IdFill(settings.Section):
    """Use these images, by id."""

    ids: Annotated[tuple[str, ...], Field(min_length=1)]

    @field_validator("ids", mode="before")
    @classmethod
    def ids_as_text(cls, value: Any) -> Any:
        """An id YAML reads as a number (20170512) is still the text of a file stem."""
        return tuple(str(item) for item in value) if isinstance(value, list) else value


Fill = Literal["best"] | ClusterFill | IdFill


def describe_fill(fill: Fill) -> str:
    """A short label of a fill, for the preview and errors."""
    if isinstance(fill, ClusterFill):
        return "clusters " + ", ".join(map(str, fill.clusters))
    if isinstance(fill, IdFill):
        return "ids " + ", ".join(fill.ids)
    return "best clusters"


class Region(settings.Section):
    """A tile of a poster: its box in px and what fills it."""

    name: str = Field(description="the region's name (its number in the list when not given)")
    x: int = Field(ge=0, description="left edge, px")
    y: int = Field(ge=0, description="top edge, px")
    width: CanvasSide
    height: CanvasSide
    fill: Fill = Field(json_schema_extra={"allowed": FILL_WORDS})

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom)."""
        return self.x, self.y, self.x + self.width, self.y + self.height


class Template(settings.Section):
    """A poster layout; `name` is its file's stem."""

    OPTIONAL: ClassVar[set[str]] = {"dpi", "background"}
    name: str
    width: CanvasSide
    height: CanvasSide
    dpi: int = Field(300, ge=1, le=4800)
    background: tuple[int, int, int] = (0, 0, 0)
    regions: Annotated[tuple[Region, ...], Field(min_length=1)] = Field(
        json_schema_extra={"allowed": "expected a list of at least one region"}
    )
    _tuple = field_validator("regions", mode="before")(as_tuple)

    @field_validator("background", mode="before")
    @classmethod
    def color(cls, value: Any) -> Any:
        """A color name or #rrggbb, as an RGB triple."""
        try:
            return ImageColor.getrgb(str(value))[:3]
        except ValueError:
            raise ValueError("expected a color such as '#000000' or 'white'") from None


def named_regions(regions: Any) -> Any:
    """The regions with a name each: their number in the list where they give none."""
    if not isinstance(regions, list):
        return regions
    return [
        {**region, "name": str(region.get("name", index + 1))}
        if isinstance(region, dict)
        else region
        for index, region in enumerate(regions)
    ]


def parse_template(document: Any, source: str, name: str) -> Template:
    """A template from its parsed YAML; every mistake is a TemplateError naming `source`."""
    if not isinstance(document, dict):
        raise TemplateError(f"{source}: expected a mapping with {template_keys()}")
    values = {**document, "regions": named_regions(document.get("regions")), "name": name}
    if "name" in document:
        raise TemplateError(f"{source}: unknown keys ['name']; a template has {template_keys()}")
    try:
        template = Template.model_validate(values)
    except ValidationError as error:
        raise template_error(error, values, source) from None
    check_layout(template, source)
    return template


def template_keys() -> list[str]:
    """The keys a template file may hold."""
    return sorted(set(Template.model_fields) - {"name"})


def template_error(error: ValidationError, values: dict[str, Any], source: str) -> TemplateError:
    """One line for the first mistake pydantic found in a template."""
    first = error.errors()[0]
    location: tuple[Any, ...] = first["loc"]
    model: type[settings.Section] = Template
    where, given, keys = source, values, template_keys()
    if location[:1] == ("regions",) and len(location) > 1 and isinstance(location[1], int):
        given = values["regions"][location[1]]
        where = (
            f"{source}, region {given.get('name') if isinstance(given, dict) else location[1] + 1}"
        )
        model, location, keys = Region, location[2:], sorted(Region.model_fields)
        if not isinstance(given, dict):
            return TemplateError(f"{where}: expected a mapping with {keys}")
    if first["type"] in ("missing", "extra_forbidden"):
        unknown = sorted(set(given) - set(model.model_fields))
        required = {name for name, field in model.model_fields.items() if field.is_required()}
        problem = (
            f"unknown keys {unknown}" if unknown else f"missing {sorted(required - set(given))}"
        )
        noun = "region" if model is Region else "template"
        return TemplateError(f"{where}: {problem}; a {noun} has {keys}")
    names, field, _ = settings.field_path(model, location)
    value = settings.value_at(given, names)
    allowed = settings.allowed_for_error(field, first)
    return TemplateError(f"{where}: {'.'.join(names)} = {value!r}: {allowed}")


def overlapping(first: Region, second: Region) -> bool:
    """Whether two regions share any pixel."""
    a, b = first.box, second.box
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def check_layout(template: Template, source: str) -> None:
    """Every region inside the canvas, named once, and overlapping no other."""
    for index, region in enumerate(template.regions):
        if region.box[2] > template.width or region.box[3] > template.height:
            raise TemplateError(
                f"{source}, region {region.name}: the box {region.box} reaches outside the "
                f"{template.width}x{template.height} canvas"
            )
        for earlier in template.regions[:index]:
            if earlier.name == region.name:
                raise TemplateError(f"{source}: two regions are named {region.name!r}")
            if overlapping(earlier, region):
                raise TemplateError(
                    f"{source}, region {region.name}: overlaps region {earlier.name}"
                )


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
