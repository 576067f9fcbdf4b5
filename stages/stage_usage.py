"""A stage's own cost, for bench/scale.py: DVC gives no figures per stage of a whole
`dvc repro`. With $STAGE_USAGE_FILE set, a stage appends one JSON line when it ends: its
name, the wall seconds since its process started, and the CPU seconds and peak memory
(largest resident set, MiB) of it and of the worker processes it waited for.

Only the standard library: sync's check that nothing changed ends before pandas loads.
Not a param: it changes what a run reports, never what it writes.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

USAGE_FILE_VARIABLE = "STAGE_USAGE_FILE"


def process_seconds() -> float:
    """Wall seconds since this process started (Linux's /proc, to a hundredth)."""
    with open("/proc/self/stat") as file:
        # Fields after the command's name, which may hold spaces: starttime is field 22,
        # in clock ticks since boot.
        fields = file.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as file:
        uptime = float(file.read().split()[0])
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def record_usage(stage: str | None = None) -> None:
    """Append this stage's line to $STAGE_USAGE_FILE, when it is set."""
    path = os.environ.get(USAGE_FILE_VARIABLE)
    if not path:
        return
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = {
        "stage": stage or Path(sys.argv[0]).stem,
        "wall": round(process_seconds(), 2),
        "cpu": round(own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime, 2),
        "peak_mib": round(max(own.ru_maxrss, workers.ru_maxrss) / 1024, 1),  # KiB on Linux
    }
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(line) + "\n")
