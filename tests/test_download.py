"""download_verified: the archive appears only when its checksum matches (file:// URLs)."""

import hashlib

import pytest

from kneurons.download import download_verified


def test_download_checks_sha256(tmp_path):
    archive = tmp_path / "served.zip"
    archive.write_bytes(b"not really a zip, but bytes with a checksum")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "mlama1.1.zip"
    download_verified(archive.as_uri(), dest, digest)
    assert dest.read_bytes() == archive.read_bytes()

    bad = tmp_path / "out" / "bad.zip"
    with pytest.raises(ValueError, match="sha256|SHA-256|digest"):
        download_verified(archive.as_uri(), bad, "0" * 64)
    assert not bad.exists()
    assert [p.name for p in bad.parent.iterdir()] == ["mlama1.1.zip"]  # no temp file left
