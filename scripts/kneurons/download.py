"""Download of the official mLAMA archive with checksum verification."""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path

from .io import atomic_path
from .mlama import verify_sha256

log = logging.getLogger(__name__)


def download_verified(url: str, dest: str | Path, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``; the file appears only if its SHA-256 equals ``sha256``."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        verify_sha256(tmp, sha256)
    log.info("saved %s (sha256 %s)", dest, sha256)
    return dest
