"""Download of the official mLAMA archive with checksum verification."""

from __future__ import annotations

import hashlib
import logging
import urllib.request
from pathlib import Path

from .io import atomic_path

log = logging.getLogger(__name__)


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_verified(url: str, dest: str | Path, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``; the file appears only if its SHA-256 equals ``sha256``."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        actual = sha256_of(tmp)
        if actual != sha256.lower():
            raise ValueError(f"{url}: sha256 {actual} does not match the expected {sha256}")
    log.info("saved %s (sha256 %s)", dest, sha256)
    return dest
