"""Logging at one place: every module logs to ``logging.getLogger("medvlp...")``; the command line calls
``setup`` once, so messages reach stderr as plain lines (no tracebacks, no logger names)."""

from __future__ import annotations

import logging
import sys
import warnings


def setup(level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger("medvlp")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def quiet_lightning() -> None:
    """Keep Lightning's device banners and tips out of the user's terminal (call after importing lightning,
    which sets its own log level on import); its warnings still show."""
    for noisy in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
