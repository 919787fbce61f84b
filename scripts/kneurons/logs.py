"""Logging of rule scripts: messages and progress bars go to the rule's log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO


def configure(log_path: str | Path | None, level: int = logging.INFO, *,
              echo_warnings: bool = False) -> TextIO:
    """Send logging, the returned stream (for tqdm) and everything written to ``sys.stderr``
    (other libraries' progress bars and warnings) to ``log_path``; stderr when None.
    ``echo_warnings``: WARNINGs and worse go to the console (the process's stderr) as well.

    Returns the text stream that progress bars should write to (``tqdm(file=stream)``).
    """
    if log_path is None:
        stream: TextIO = sys.stderr
    else:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (process lifetime)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if log_path is not None:
        # whatever else writes to stderr (transformers' "Loading weights" bars, library
        # warnings) lands in the log too, not on Snakemake's console
        sys.stderr = stream
    if echo_warnings and log_path is not None:
        console = logging.StreamHandler(sys.__stderr__)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(console)
    root.setLevel(level)
    logging.captureWarnings(True)
    previous_hook = sys.excepthook

    def log_uncaught(exc_type, exc, tb):  # the traceback lands in the rule's log too
        logging.getLogger("kneurons").error("failed", exc_info=(exc_type, exc, tb))
        previous_hook(exc_type, exc, tb)

    sys.excepthook = log_uncaught
    return stream
