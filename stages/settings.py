"""Params: reading params.yaml and checking each section against its pydantic model.

Every stage declares its section as a `Section` model (typed fields with their bounds or
choices, default and one-line meaning), the single place a param is described. The
README's params table is generated from these models (`make params-doc`).

A bad value never ends in a traceback: it becomes one line naming the key, the value and
what is allowed, such as
`params.yaml: image.fit = 'stretch' is not allowed; allowed: squash, crop, pad`.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from stages.common import PARAMS_FILE, UserError

# Short texts for pydantic's error kinds, in the wording users already see.
TYPE_WORDS = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
}


BOUND_SIGNS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}


class Section(BaseModel):
    """A checked params section (or sub-section): strict types, no unknown keys, frozen.

    `SECTION` names the top-level key of params.yaml a stage's model reads. A field whose
    `json_schema_extra` holds `allowed` uses that text in every error and in the README.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    SECTION: ClassVar[str] = ""

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Self:
        """Check the model's section of the whole params mapping; a bad key is a UserError."""
        if cls.SECTION not in params:
            raise UserError(f"{PARAMS_FILE}: {cls.SECTION} is missing")
        section = params[cls.SECTION]
        check_every_key_given(cls, section)
        try:
            return cls.model_validate(section)
        except ValidationError as error:
            raise validation_error_line(cls, section, error) from None


def check_every_key_given(model: type[Section], section: Any) -> None:
    """Fail on the first key the section leaves out: params.yaml states every value.

    The models' defaults document the shipped values and serve code that builds params
    directly; a key missing from params.yaml would also be missing for DVC.
    """
    names = first_missing_key(model, section)
    if names is None:
        return
    *above, _ = names
    whole = allowed_text(field_at(model, above))
    if whole:  # a sub-mapping with its own wording (split.proportions) is judged as a whole
        raise param_error(".".join([model.SECTION, *above]), value_at(section, above), whole)
    raise UserError(f"{PARAMS_FILE}: {'.'.join([model.SECTION, *names])} is missing")


def first_missing_key(model: type[BaseModel], values: Any) -> list[str] | None:
    """The path of the first field of `model` (or its sub-sections) absent from `values`."""
    if not isinstance(values, dict):
        return None  # the wrong kind of value: validation names it
    for name, field in model.model_fields.items():
        if name not in values:
            return [name]
        inner = section_model(field.annotation)
        below = first_missing_key(inner, values[name]) if inner is not None else None
        if below is not None:
            return [name, *below]
    return None


def field_at(model: type[BaseModel], names: list[str]) -> FieldInfo | None:
    """The field at a path of names (None for the section itself)."""
    field, current = None, model
    for name in names:
        field = current.model_fields[name]
        current = section_model(field.annotation)  # type: ignore[assignment]
    return field


def param_error(key: str, value: Any, allowed: str) -> UserError:
    """The one-line error for a param value that is not allowed."""
    return UserError(f"{PARAMS_FILE}: {key} = {value!r} is not allowed; {allowed}")


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml into a dict; a missing or unreadable file is a UserError."""
    try:
        with open(path, encoding="utf-8") as file:
            params = yaml.safe_load(file)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stage from the project root") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must hold a mapping of sections, found {type(params).__name__}")
    return params


# ----------------------------------------------------------------------------- errors


def validation_error_line(model: type[Section], section: Any, error: ValidationError) -> UserError:
    """One line for the first problem pydantic found in `section`."""
    first = error.errors()[0]
    names, field, parent = field_path(model, first["loc"])
    if first["type"] == "extra_forbidden":
        if not allowed_text(parent):
            key, known = ".".join([model.SECTION, *names]), ", ".join(fields_at(model, names[:-1]))
            return UserError(f"{PARAMS_FILE}: {key} is not a known param; allowed keys: {known}")
        # A sub-mapping with its own wording (split.proportions) is judged as a whole.
        names, field = names[:-1], parent
    key = ".".join([model.SECTION, *names])
    return param_error(key, value_at(section, names), allowed_for_error(field, first))


def field_path(
    model: type[BaseModel], location: tuple[Any, ...]
) -> tuple[list[str], FieldInfo | None, FieldInfo | None]:
    """The field names along an error location, the last field and the one above it.

    The walk stops at the first part that is not a field (a list index, a union member),
    so the key named is the param the user wrote.
    """
    names: list[str] = []
    field: FieldInfo | None = None
    parent: FieldInfo | None = None
    current: Any = model
    for part in location:
        fields = getattr(current, "model_fields", None)
        if not isinstance(part, str) or not fields:
            if fields is not None and isinstance(part, str):
                names.append(part)  # an unknown key inside a model
            break
        parent, field = field, fields.get(part)
        names.append(part)
        if field is None:
            break
        current = section_model(field.annotation)
    return names, field, parent


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The sub-section model a field holds, if any."""
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def fields_at(model: type[BaseModel], names: list[str]) -> list[str]:
    """The keys a (sub-)section allows."""
    field = field_at(model, names)
    current = model if field is None else section_model(field.annotation)
    return list(current.model_fields) if current is not None else []


def value_at(section: Any, names: list[str]) -> Any:
    """The value the user wrote at a path inside a section."""
    value = section
    for name in names:
        value = value.get(name) if isinstance(value, dict) else None
    return value


def allowed_text(field: FieldInfo | None) -> str | None:
    """A field's own wording of what it allows, if it has one."""
    extra = field.json_schema_extra if field is not None else None
    return extra.get("allowed") if isinstance(extra, dict) else None  # type: ignore[return-value]


def bounds(field: FieldInfo) -> tuple[Any, Any]:
    """A field's lower and upper bound (None where open)."""
    low = high = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low = item.gt
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high = item.lt
    return low, high


def is_integer_field(field: FieldInfo) -> bool:
    """True for int and optional int fields."""
    return int in value_types(field.annotation)


def value_types(annotation: Any) -> set[Any]:
    """The plain types a (possibly optional) annotation accepts."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {arg for arg in typing.get_args(annotation) if arg is not type(None)}
    return {annotation}


def range_text(field: FieldInfo) -> str:
    """'an integer >= 1', 'a number in [0, 1]'... from a field's bounds."""
    low, high = bounds(field)
    if is_integer_field(field):
        if low is not None and high is not None:
            return f"an integer in [{low}, {high}]"
        if low is not None:
            return f"an integer >= {low}"
        return f"an integer <= {high}" if high is not None else "an integer"
    if low is None and high is None:
        return "a number"
    low_text = "-inf" if low is None else f"{low}"
    opening = "(" if any(isinstance(m, annotated_types.Gt) for m in field.metadata) else "["
    return f"a number in {opening}{low_text}, {'inf' if high is None else high}]"


def allowed_for_error(field: FieldInfo | None, error: Any) -> str:
    """What to tell the user is allowed, for one pydantic error at one field."""
    kind = error["type"]
    if kind == "value_error":  # a validator of the model says it in its own words
        return str(error.get("ctx", {}).get("error", error["msg"]))
    own = allowed_text(field)
    if own:
        return own
    if kind == "literal_error" and field is not None:
        return "allowed: " + ", ".join(str(choice) for choice in choices(field))
    if kind in BOUND_SIGNS and field is not None:
        if is_integer_field(field):  # the bound crossed, as before: "an integer >= 1"
            return f"expected an integer {BOUND_SIGNS[kind]} {next(iter(error['ctx'].values()))}"
        return "expected " + range_text(field)
    if (
        kind == "string_type"
        and field is not None
        and type(None) in typing.get_args(field.annotation)
    ):
        return "expected a string or null"
    return TYPE_WORDS.get(kind, error["msg"])


def choices(field: FieldInfo) -> list[Any]:
    """The values a Literal field allows."""
    annotation = field.annotation
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return []


# ----------------------------------------------------------------------------- the README table


def describe_allowed(field: FieldInfo) -> str:
    """What a field allows, in words, for the params table."""
    own = allowed_text(field)
    if own:
        return own.removeprefix("expected ")
    options = choices(field)
    if options:
        return " \\| ".join(f"`{option}`" for option in options)
    kinds = value_types(field.annotation)
    optional = type(None) in typing.get_args(field.annotation)
    if kinds == {bool}:
        text = "true \\| false"
    elif kinds & {int, float}:
        text = range_text(field)
    elif kinds == {str}:
        text = "text"
    else:
        text = str(field.annotation)
    return text + (", or null" if optional else "")


def params_table_rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, allowed, default, meaning) of every param of a model, sub-sections flattened."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        inner = section_model(field.annotation)
        if inner is not None:
            rows.extend(params_table_rows(inner, key))
            continue
        default = field.get_default(call_default_factory=True)
        default = str(default) if isinstance(default, Path) else default
        shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True)
        shown = shown.strip().removesuffix("...").strip()
        rows.append((key, describe_allowed(field), shown, field.description or ""))
    return rows


def params_table(models: list[type[Section]]) -> str:
    """The README's params table (Markdown), from the section models in pipeline order."""
    lines = ["| key | allowed | default | meaning |", "|---|---|---|---|"]
    for model in models:
        for key, allowed, default, meaning in params_table_rows(model, model.SECTION):
            cells = (f"`{key}`", allowed, f"`{default}`", meaning.replace("|", "\\|"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The default value of every key of a model, as params.yaml would hold them."""
    values = {}
    for name, field in model.model_fields.items():
        inner = section_model(field.annotation)
        value = defaults(inner) if inner else field.get_default(call_default_factory=True)
        values[name] = str(value) if isinstance(value, Path) else value
    return values
