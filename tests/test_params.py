"""Params are declared once, as pydantic models: every bad value of every key gives one
line, and params.yaml, dvc.yaml and the README agree with the models."""

from __future__ import annotations

import ast
import copy
import typing
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from conftest import REPO_ROOT

from stages import common, settings
from tools import params_doc

MODELS = params_doc.all_models()


def leaf_keys(model: type[Any], prefix: list[str] | None = None) -> list[tuple[list[str], Any]]:
    """(path inside the section, field) of every leaf param of a model."""
    prefix = prefix or []
    leaves = []
    for name, field in model.model_fields.items():
        inner = settings.section_model(field.annotation)
        if inner is not None:
            leaves.extend(leaf_keys(inner, [*prefix, name]))
        else:
            leaves.append(([*prefix, name], field))
    return leaves


def bad_values(field: Any) -> list[Any]:
    """Values a field must refuse: a mapping always, an unknown choice, out-of-range numbers."""
    values: list[Any] = [{"not": "a value"}]
    if settings.choices(field):
        values.append("no-such-choice")
    low, high = settings.bounds(field)
    strict_low = any(isinstance(item, annotated_types.Gt) for item in field.metadata)
    if low is not None:
        values.append(low if strict_low else low - 1)
    if high is not None:
        values.append(high + 1)
    return values


CASES = [
    pytest.param(model, path, value, id=".".join([model.SECTION, *path]) + f"={value!r}")
    for model in MODELS
    for path, field in leaf_keys(model)
    for value in bad_values(field)
]


def with_value(project_params: dict[str, Any], section: str, path: list[str], value: Any) -> dict:
    """A copy of the committed params with one key set."""
    params = copy.deepcopy(project_params)
    target = params[section]
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = value
    return params


@pytest.mark.parametrize(("model", "path", "value"), CASES)
def test_every_bad_value_of_every_key_gives_one_line_naming_it(
    project_params: dict[str, Any], model: Any, path: list[str], value: Any
) -> None:
    params = with_value(project_params, model.SECTION, path, value)
    with pytest.raises(common.UserError) as error:
        model.from_params(params)
    message = str(error.value)
    key = ".".join([model.SECTION, *path])
    assert message.startswith(f"params.yaml: {key} = {value!r} is not allowed; ")
    assert "\n" not in message
    assert len(message.split("; ", 1)[1]) > 5, "it says what is allowed"


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.SECTION)
def test_the_committed_params_are_accepted_and_are_the_models_defaults(
    project_params: dict[str, Any], model: Any
) -> None:
    model.from_params(project_params)
    assert settings.defaults(model) == project_params[model.SECTION]


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.SECTION)
def test_a_missing_and_an_unknown_key_are_named(project_params: dict[str, Any], model: Any) -> None:
    path, _ = leaf_keys(model)[-1]
    params = copy.deepcopy(project_params)
    target = params[model.SECTION]
    for name in path[:-1]:
        target = target[name]
    del target[path[-1]]
    key = ".".join([model.SECTION, *path])
    with pytest.raises(common.UserError, match=f"^params.yaml: {key} is missing$"):
        model.from_params(params)
    params = copy.deepcopy(project_params)
    params[model.SECTION]["surprise"] = 1
    with pytest.raises(common.UserError) as error:
        model.from_params(params)
    assert str(error.value).startswith(f"params.yaml: {model.SECTION}.surprise is not a known")
    assert f"allowed keys: {', '.join(model.model_fields)}" in str(error.value)


def test_a_missing_section_is_named() -> None:
    with pytest.raises(common.UserError, match=r"^params\.yaml: cluster is missing$"):
        params_doc.STAGE_MODELS["cluster"][0].from_params({})


def flat_keys(model: Any) -> list[str]:
    """Every dotted key a model reads."""
    return [".".join([model.SECTION, *path]) for path, _ in leaf_keys(model)]


def dvc_stages() -> dict[str, Any]:
    """The stages of dvc.yaml."""
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(params_doc.STAGE_MODELS))
def test_each_stage_lists_exactly_the_keys_its_models_read(stage: str) -> None:
    keys = {key for model in params_doc.STAGE_MODELS[stage] for key in flat_keys(model)}
    listed = dvc_stages()[stage].get("params", [])
    # A listed key covers itself and, for a mapping such as split.proportions, its keys.
    covered = {key for key in keys if any(key == it or key.startswith(f"{it}.") for it in listed)}
    assert covered == keys, keys - covered
    assert all(any(key == it or key.startswith(f"{it}.") for key in keys) for it in listed)


def imported_stage_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """The modules of the stages package that a module imports, directly or not."""
    seen = set() if seen is None else seen
    tree = ast.parse((REPO_ROOT / "stages" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module == "stages":
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
            names = [typing.cast(str, node.module).split(".", 1)[1]]
        for name in names:
            if name not in seen:
                seen.add(name)
                imported_stage_modules(name, seen)
    return seen


@pytest.mark.parametrize("stage", list(params_doc.STAGE_MODELS))
def test_each_stage_depends_on_every_module_it_runs(stage: str) -> None:
    deps = set(dvc_stages()[stage]["deps"])
    modules = imported_stage_modules(stage) | {stage}
    # settings only checks params, project_lock only refuses a second run, native_logs
    # and stage_log only filter and format log lines, stage_usage only reports a stage's
    # cost: a change to any of them cannot change an output.
    unneeded = {"settings", "project_lock", "native_logs", "stage_log", "stage_usage"}
    needed = {f"stages/{module}.py" for module in modules - unneeded}
    if "quiet_start" in modules:
        needed.add("stages/__init__.py")  # it sets TensorFlow's numerics options
    assert needed <= deps, needed - deps


def test_the_readme_params_table_is_current() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert params_doc.readme_with_table(readme) == readme, "run `make params-doc`"


def test_the_table_gives_every_key_with_its_default_and_meaning() -> None:
    table = settings.params_table(MODELS)
    for model in MODELS:
        for key in flat_keys(model):
            row = next(line for line in table.splitlines() if line.startswith(f"| `{key}` |"))
            cells = [cell.strip() for cell in row.strip("|").split(" | ")]
            assert len(cells) == 4 and all(cells), row


def test_stage_docstrings_point_to_their_models_instead_of_listing_keys() -> None:
    for stage, models in params_doc.STAGE_MODELS.items():
        docstring = ast.get_docstring(ast.parse((REPO_ROOT / f"stages/{stage}.py").read_text()))
        assert docstring is not None
        params_line = next(line for line in docstring.splitlines() if line.startswith("Params:"))
        for model in models:
            assert model.__name__ in params_line, stage


def test_the_posters_template_folder_is_a_path(project_params: dict[str, Any]) -> None:
    model = params_doc.STAGE_MODELS["posters"][0]
    assert model.from_params(project_params).templates == Path("templates/posters")
