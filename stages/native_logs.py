"""Native libraries' log lines, filtered by TF_CPP_MIN_LOG_LEVEL (see quiet_start).

TensorFlow (through Abseil) and LiteRT (through its own logger) write INFO and WARNING
lines straight to file descriptor 2, at times when no environment variable reaches their
level. native_logs_filtered sends descriptor 2 through a small filter process for the
length of a block. Only log lines change: nothing here changes what a stage writes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# The filter: a line-by-line copy of stdin to stdout that drops Abseil lines whose
# severity letter is in argv[1]. Run with -S -I: it must start fast and import nothing.
FILTER_PROGRAM = r"""
import re, sys
dropped = sys.argv[1].encode()
absl_line = re.compile(rb"([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
lite_line = re.compile(rb"(I)NFO: |(W)ARNING: ")  # LiteRT's own logger
notice = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
for line in sys.stdin.buffer:
    match = absl_line.match(line) or lite_line.match(line)
    if (match and match.group(match.lastindex) in dropped) or line.rstrip(b"\r\n") == notice:
        continue
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()
"""


def dropped_severities(level_text: str | None) -> str:
    """The Abseil severity letters that TF_CPP_MIN_LOG_LEVEL asks to drop ('' keeps all).

    ERROR and FATAL are never dropped here, whatever the level: they may explain a crash.
    """
    try:
        level = int(level_text or "0")
    except ValueError:
        return ""
    return "IW"[: max(0, min(level, 2))]


@contextlib.contextmanager
def native_logs_filtered() -> Iterator[None]:
    """While the block runs, send this process's stderr (file descriptor 2) through the filter."""
    dropped = dropped_severities(os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
    if not dropped:
        yield
        return
    sys.stderr.flush()
    original = os.dup(2)
    try:
        command = [sys.executable, "-S", "-I", "-c", FILTER_PROGRAM, dropped]
        with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=original) as line_filter:
            assert line_filter.stdin is not None
            os.dup2(line_filter.stdin.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(original, 2)
                line_filter.stdin.close()  # the filter sees the end and exits
    finally:
        os.close(original)
