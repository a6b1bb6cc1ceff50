"""One log format for every stage, and progress bars that stay readable in a terminal and in a log file."""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(level: int | None = None) -> None:
    """Stage messages on stderr in one format (idempotent). Under torchrun global rank 0 reports and the other
    ranks only warn, so a line is not printed once per rank."""
    if level is None:
        level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def progress(total: int | None, *, unit: str, desc: str, disable: bool = False) -> tqdm:
    """A tqdm bar with a total; off a terminal (CI, DVC logs) it prints a line every few seconds at most
    (``TQDM_MININTERVAL`` seconds, default 10) instead of thousands of updates."""
    tty = sys.stderr.isatty()
    interval = float(os.environ.get("TQDM_MININTERVAL", 0.1 if tty else 10))
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=tty, mininterval=interval,
                maxinterval=max(interval, 10), disable=disable)
