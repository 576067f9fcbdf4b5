"""Keras, loaded so that TensorFlow's start-up lines obey TF_CPP_MIN_LOG_LEVEL.

TensorFlow's native libraries log through Abseil from their static initializers, while
they are being loaded and before TensorFlow applies TF_CPP_MIN_LOG_LEVEL, so INFO lines
such as "oneDNN custom operations are on" and "Could not find cuda drivers" appear at
every start, twice (libtensorflow_framework and the profiler plugin each carry a copy of
Abseil), along with Abseil's "All log messages before absl::InitializeLog()" note. No
environment variable reaches Abseil's level at that point.

So while Keras (and with it TensorFlow) loads, the process's stderr goes through a small
filter process that passes every line on at once except Abseil lines of a severity that
TF_CPP_MIN_LOG_LEVEL asks to drop: INFO at 1 and above, WARNING at 2 and above. ERROR and
FATAL lines always pass, and since the filter is a process of its own, a line written just
before a crash still reaches the terminal.

Keras loads with scikit-learn hidden (see scikit_learn_hidden).

Stages import Keras from here: `from stages.quiet_start import keras`.
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
notice = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
for line in sys.stdin.buffer:
    match = absl_line.match(line)
    if (match and match.group(1) in dropped) or line.rstrip(b"\r\n") == notice:
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


@contextlib.contextmanager
def scikit_learn_hidden() -> Iterator[None]:
    """Make `import sklearn` fail inside the block, unless it is already imported.

    Keras imports its scikit-learn wrappers, and with them all of scikit-learn (about a
    second, a third of embed's start on a daily run), whenever scikit-learn is installed.
    No stage uses those wrappers, and they are written to do without scikit-learn. A stage
    that needs scikit-learn later (PCA, MiniBatchKMeans) imports it as usual.
    """
    if "sklearn" in sys.modules:
        yield
        return
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        if sys.modules.get("sklearn", 0) is None:
            del sys.modules["sklearn"]


with native_logs_filtered(), scikit_learn_hidden():
    import keras  # loads TensorFlow

__all__ = ["keras"]
