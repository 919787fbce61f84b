"""Download of the official mLAMA archive, verified file by file.

The archive's own checksum is not published; instead the repository ships the SHA-256 of every
file of the en/ and zh/ parts of mLAMA 1.1 (``resources/mlama1.1-en-zh.sha256``, in
``sha256sum`` format), and :func:`verify_archive` checks the downloaded archive's files of the
run's languages against it. A language the list does not cover needs the archive's SHA-256
(``mlama.sha256``), checked by :func:`download_verified`.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path

from .io import atomic_path
from .mlama import verify_sha256

log = logging.getLogger(__name__)


def download_verified(url: str, dest: str | Path, sha256: str | None = None, *,
                      checksums: str | Path | None = None, languages: Iterable[str] = (),
                      timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``; the file appears only if it verifies: its SHA-256 equals
    ``sha256`` (when given), and its files of ``languages`` match ``checksums`` (when given)."""
    if sha256 is None and checksums is None:
        raise ValueError("nothing to verify the download against: give sha256 or checksums")
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        if sha256 is not None:
            verify_sha256(tmp, sha256)
        if checksums is not None:
            n = verify_archive(tmp, checksums, languages, name=url)
            log.info("%d files of %s match %s", n, sorted(languages), checksums)
    log.info("saved %s", dest)
    return dest


def read_checksums(path: str | Path) -> dict[str, str]:
    """``sha256sum`` lines (``<hex>  <path>``) as {path: hex}."""
    out = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise ValueError(f"{path}, line {number}: not a sha256sum line: {line!r}")
        out[name.strip()] = digest.lower()
    return out


def covered_languages(checksums: str | Path) -> set[str]:
    """The languages whose files the list covers (``mlama1.1/<lang>/...``)."""
    return {name.split("/")[1] for name in read_checksums(checksums) if name.count("/") >= 2}


def verify_archive(archive: str | Path, checksums: str | Path, languages: Iterable[str], *,
                   name: str | None = None) -> int:
    """Check every listed file of ``languages`` in the zip ``archive`` against ``checksums``;
    a ValueError names the first file that is missing or differs. Returns the files checked."""
    expected = read_checksums(checksums)
    wanted = {lang for lang in languages}
    missing_langs = wanted - covered_languages(checksums)
    if missing_langs:
        raise ValueError(f"{checksums} has no checksums for languages {sorted(missing_langs)}")
    label = name or str(archive)
    with zipfile.ZipFile(archive) as zf:
        members = {m: m for m in zf.namelist()}
        # the archive may hold mlama1.1/<lang>/... or <lang>/... at its root
        for member in list(members):
            if not member.startswith("mlama1.1/"):
                members.setdefault("mlama1.1/" + member, member)
        checked = 0
        for path, digest in sorted(expected.items()):
            if path.split("/")[1] not in wanted:
                continue
            member = members.get(path)
            if member is None:
                raise ValueError(f"{label}: {path} is missing from the archive")
            actual = hashlib.sha256(zf.read(member)).hexdigest()
            if actual != digest:
                raise ValueError(f"{label}: {path} differs from mLAMA 1.1 (SHA-256 {actual}, "
                                 f"expected {digest} from {checksums})")
            checked += 1
    return checked
