"""The GPU workflow for users' own CI: it parses, and names every step it must run.

It cannot run here (it launches a cloud GPU machine), so its shape is checked instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github/workflows/reproduce-on-gpu.yaml"


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def step_commands(job: dict[str, Any]) -> list[str]:
    return [step.get("run", "") for step in job["steps"]]


def position(commands: list[str], pattern: str) -> int:
    """The index of the first step whose command matches `pattern`; fails if none does."""
    for index, command in enumerate(commands):
        if re.search(pattern, command):
            return index
    raise AssertionError(f"no step runs {pattern!r}")


def test_it_runs_on_pull_requests_and_every_step_is_whole(workflow: dict[str, Any]) -> None:
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "pull_request" in triggers
    for name, job in workflow["jobs"].items():
        assert job["steps"], name
        for step in job["steps"]:
            assert ("run" in step) != ("uses" in step), (name, step)
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]


def test_one_job_launches_a_gpu_runner_with_cml(workflow: dict[str, Any]) -> None:
    launch = workflow["jobs"]["launch-runner"]
    assert any(step.get("uses", "").startswith("iterative/setup-cml@") for step in launch["steps"])
    command = step_commands(launch)[position(step_commands(launch), r"cml runner launch")]
    assert "--cloud=" in command and "--labels=cml-gpu" in command
    assert "gpu" in command or re.search(r"--cloud-type=(g\d|p\d)", command)


def test_the_other_job_reproduces_on_that_runner_and_comments(workflow: dict[str, Any]) -> None:
    job = workflow["jobs"]["reproduce"]
    assert job["needs"] == "launch-runner"
    assert set(job["runs-on"]) == {"self-hosted", "cml-gpu"}
    checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0, "metrics diff against main needs its history"
    commands = step_commands(job)
    order = [
        position(commands, r"pip install -r requirements\.txt"),
        position(commands, r"tensorflow\[and-cuda\]"),
        position(commands, r"\bdvc pull\b"),
        position(commands, r"\bdvc repro\b"),
        position(commands, r"\bdvc push\b"),
        position(commands, r"dvc metrics diff \S*main --md"),
        position(commands, r"dvc params diff \S*main --md"),
        position(commands, r"cml comment create"),
    ]
    assert order == sorted(order)
    pinned = re.search(r"^tensorflow==(\S+)$", (REPO_ROOT / "requirements.txt").read_text(), re.M)
    assert pinned and f"tensorflow[and-cuda]=={pinned.group(1)}" in "\n".join(commands)


def test_every_secret_it_uses_is_documented() -> None:
    secrets = set(re.findall(r"secrets\.(\w+)", WORKFLOW.read_text())) - {"GITHUB_TOKEN"}
    assert secrets == {"PERSONAL_ACCESS_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## CI on a GPU runner") :]
    for secret in secrets:
        assert f"`{secret}`" in section, secret


def test_the_readme_names_the_workflow_file() -> None:
    assert str(WORKFLOW.relative_to(REPO_ROOT)) in (REPO_ROOT / "README.md").read_text()
    assert Path(WORKFLOW).read_text().count("\t") == 0
