"""The stages' loggers: `stage: message` lines on stderr. Only the standard library, so
that sync's check can log before Python loads pandas (see stages/sync.py). Only log lines
come from here: nothing a stage writes.
"""

from __future__ import annotations

import logging
import sys


def get_logger(stage: str) -> logging.Logger:
    """A logger that prints 'stage: message' lines to stderr."""
    logger = logging.getLogger(stage)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
