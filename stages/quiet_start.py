"""Keras, loaded so that TensorFlow's start-up lines obey TF_CPP_MIN_LOG_LEVEL.

TensorFlow's native libraries log through Abseil from their static initializers, while
they are being loaded and before TensorFlow applies TF_CPP_MIN_LOG_LEVEL, so INFO lines
such as "oneDNN custom operations are on" and "Could not find cuda drivers" appear at
every start, twice (libtensorflow_framework and the profiler plugin each carry a copy of
Abseil), along with Abseil's "All log messages before absl::InitializeLog()" note. No
environment variable reaches Abseil's level at that point.

So while Keras (and with it TensorFlow) loads, the process's stderr goes through a small
filter process that passes every line on at once except Abseil lines of a severity that
TF_CPP_MIN_LOG_LEVEL asks to drop: INFO at 1 and above, WARNING at 2 and above (and
likewise LiteRT's `INFO: ` and `WARNING: ` lines, see encoder_runtime). ERROR and
FATAL lines always pass, and since the filter is a process of its own, a line written just
before a crash still reaches the terminal.

Keras loads with scikit-learn hidden (see scikit_learn_hidden).

Stages import Keras from here: `from stages.quiet_start import keras`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from stages.native_logs import dropped_severities, native_logs_filtered


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

__all__ = ["dropped_severities", "keras", "native_logs_filtered"]
