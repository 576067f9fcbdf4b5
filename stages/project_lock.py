"""One run at a time in a project: a second `dvc repro` (or a stage started by hand) while
another run holds the project stops at once, and the first run is unharmed.

DVC's own locks do half of this. Its repo lock is let go while a stage's command runs,
so that the command may call DVC, and taken back between stages. Its rwlock
(.dvc/tmp/rwlock) keeps other DVC commands off the running stage's deps and outs, but
only those: a second `dvc repro` would delete the outputs of any other stage it means to
rerun before that stage could refuse. So two locks here:
- a write entry for the whole project folder in DVC's rwlock, held while a stage runs:
  DVC then refuses the second command's first stage before it removes anything;
- a lock of the run (the `dvc` process that started the stage, or the stage itself when
  run by hand) that every stage of that run passes and a stage of any other run does
  not. It is free again once that process has died, without any clean-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = Path(".dvc/tmp/smart-iss-posts-run.json")  # .dvc/tmp is DVC's, kept out of git
DVC_RWLOCK = "rwlock"  # DVC's table of what each running command reads and writes, beside it


class ProjectBusyError(Exception):
    """Another run holds the project."""


def process_status(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 first), or None if
    the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot), or None if it is gone.

    With the pid it tells one process from a later one that got the same pid.
    """
    status = process_status(pid)
    return status[19] if status else None  # field 22: starttime


def process_command(pid: int) -> list[str]:
    """A process's command line, as its arguments."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def parent_pid(pid: int) -> int | None:
    """A process's parent, from /proc."""
    status = process_status(pid)
    return int(status[1]) if status else None  # field 4: ppid


def is_dvc(command: list[str]) -> bool:
    """Whether a command line is DVC's (`dvc repro`, `python -m dvc exp run`...)."""
    return any(Path(argument).name == "dvc" for argument in command[:3])


def run_owner(pid: int) -> int:
    """The process that owns the run a stage belongs to: the nearest `dvc` ancestor, else
    the stage itself."""
    ancestor = parent_pid(pid)
    while ancestor not in (None, 0, 1):
        if is_dvc(process_command(ancestor)):
            return ancestor
        ancestor = parent_pid(ancestor)
    return pid


def holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the process a lock names still runs (the same process, not a pid reused)."""
    pid = holder.get("pid")
    return isinstance(pid, int) and process_start(pid) == holder.get("start")


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[Any]:
    """The lock file, opened and flock-ed for a short read-and-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield file
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def hold_project(path: Path = LOCK_FILE, pid: int | None = None) -> str | None:
    """Claim the project for the run this process belongs to, or raise ProjectBusyError.

    Returns what holds the project now (the run's command and process), or None outside a
    DVC project (a stage run in a bare folder), where it does nothing.
    """
    if not path.parent.parent.is_dir():
        return None
    owner = run_owner(os.getpid() if pid is None else pid)
    mine = {"pid": owner, "start": process_start(owner), "command": process_command(owner)}
    with exclusive(path) as file:
        file.seek(0)
        try:
            holder = json.loads(file.read() or "{}")
        except json.JSONDecodeError:
            holder = {}
        if holder_alive(holder) and holder["pid"] != owner:
            command = " ".join(holder.get("command") or []) or "another command"
            raise ProjectBusyError(
                f"another run holds this project: `{command}` (process {holder['pid']}); "
                "wait for it to end, or stop it, then run again"
            )
        file.seek(0)
        file.truncate()
        file.write(json.dumps(mine))
    return f"`{' '.join(mine['command'])}` (process {owner})"


@contextlib.contextmanager
def dvc_guard(holder: str | None, stage: str) -> Iterator[None]:
    """While this stage runs, an entry in DVC's rwlock that marks the whole project as
    being written by it, so that any other DVC command stops before it touches a file.

    The entry is this process's own: DVC drops it by itself if the process is killed.
    DVC's parent process does no rwlock work while its stage's command runs, so the entry
    never stands in the way of the run it belongs to. Nothing is done without a holder
    (outside a DVC project).
    """
    if holder is None:
        yield
        return
    project = str(Path.cwd())  # what DVC calls the repo root: stages run in it
    mine = {
        "pid": os.getpid(),
        "cmd": f"{holder}, now in stage {stage}: wait for it to end, or stop it, then run again",
    }
    with edit_dvc_rwlock() as table:
        table["write"][project] = mine
    try:
        yield
    finally:
        with edit_dvc_rwlock() as table:
            if table["write"].get(project) == mine:
                del table["write"][project]
            if not table["write"]:
                del table["write"]  # as DVC leaves it


@contextlib.contextmanager
def edit_dvc_rwlock() -> Iterator[dict[str, Any]]:
    """DVC's rwlock table, edited as DVC edits it (dvc/rwlock.py, _edit_rwlock): read and
    written back under DVC's own lock of its guard file. DVC's public rwlock() cannot be
    used, as it would find our own parent's entries for this stage and refuse; and its
    private editor imports dvc.fs, a sixteenth of a second in every stage."""
    from dvc.lock import make_lock

    path = LOCK_FILE.parent / DVC_RWLOCK
    with make_lock(str(path.with_name(DVC_RWLOCK + ".lock")), tmp_dir=str(path.parent)):
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            table = {}
        except json.JSONDecodeError:
            raise ProjectBusyError(
                f"{path} is not JSON: remove it once no other DVC command runs here"
            ) from None
        table.setdefault("read", {})
        table.setdefault("write", {})
        yield table
        path.write_text(json.dumps(table), encoding="utf-8")
