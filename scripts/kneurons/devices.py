"""Choice of the torch device for a job."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def pick_device(requested: str | None = None) -> str:
    """``requested`` if given, else ``cuda`` when a GPU is visible, else ``cpu``."""
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    log.info("device: %s", device)
    return device
