"""The verified mLAMA download: the archive appears only when every en/zh file matches the
shipped SHA-256 list (or its own checksum); served over loopback HTTP here."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from kneurons.download import (covered_languages, download_verified, read_checksums,
                               verify_archive)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "resources" / "mlama1.1-en-zh.sha256"


@contextlib.contextmanager
def served(folder: Path):
    """An HTTP server on 127.0.0.1 serving ``folder``; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def archive(tmp_path: Path, files: dict[str, bytes], name: str = "mlama1.1.zip") -> Path:
    path = tmp_path / "www" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return path


FILES = {"mlama1.1/en/P17.jsonl": b'{"a": 1}\n', "mlama1.1/zh/P17.jsonl": b'{"b": 2}\n',
         "mlama1.1/fr/P17.jsonl": b'{"c": 3}\n'}


@pytest.fixture()
def checksums(tmp_path):
    path = tmp_path / "sums"
    path.write_text("".join(f"{hashlib.sha256(data).hexdigest()}  {member}\n"
                            for member, data in FILES.items() if "/fr/" not in member))
    return path


def test_a_download_over_loopback_is_verified_file_by_file(tmp_path, checksums):
    archive(tmp_path, FILES)
    with served(tmp_path / "www") as url:
        dest = download_verified(f"{url}/mlama1.1.zip", tmp_path / "out" / "m.zip",
                                 checksums=checksums, languages=["en", "zh"])
    assert zipfile.ZipFile(dest).read("mlama1.1/en/P17.jsonl") == FILES["mlama1.1/en/P17.jsonl"]


def test_a_changed_or_missing_file_fails_and_leaves_nothing(tmp_path, checksums):
    archive(tmp_path, {**FILES, "mlama1.1/zh/P17.jsonl": b'{"b": 3}\n'}, "changed.zip")
    archive(tmp_path, {k: v for k, v in FILES.items() if "/en/" not in k}, "missing.zip")
    out = tmp_path / "out"
    with served(tmp_path / "www") as url:
        with pytest.raises(ValueError, match="zh/P17.jsonl differs from mLAMA 1.1"):
            download_verified(f"{url}/changed.zip", out / "a.zip", checksums=checksums,
                              languages=["en", "zh"])
        with pytest.raises(ValueError, match="en/P17.jsonl is missing"):
            download_verified(f"{url}/missing.zip", out / "b.zip", checksums=checksums,
                              languages=["en"])
        # fr is not in the list: its files cannot be verified by it
        with pytest.raises(ValueError, match="no checksums for languages"):
            download_verified(f"{url}/missing.zip", out / "c.zip", checksums=checksums,
                              languages=["fr"])
    assert not out.exists() or list(out.iterdir()) == []


def test_the_archive_checksum_still_works_and_something_must_be_checked(tmp_path):
    path = archive(tmp_path, FILES)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    download_verified(path.as_uri(), tmp_path / "ok.zip", digest)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        download_verified(path.as_uri(), tmp_path / "bad.zip", "0" * 64)
    with pytest.raises(ValueError, match="nothing to verify"):
        download_verified(path.as_uri(), tmp_path / "none.zip")
    assert not (tmp_path / "bad.zip").exists()


def test_the_shipped_list_covers_en_and_zh_and_matches_the_bundled_whole_files():
    sums = read_checksums(SHIPPED)
    assert covered_languages(SHIPPED) == {"en", "zh"}
    assert {"mlama1.1/en/P17.jsonl", "mlama1.1/zh/templates.jsonl"} <= set(sums)
    # the bundled whole relations and the templates are byte copies of mLAMA 1.1
    bundled = [p for p in (REPO / "resources" / "mlama-relations" / "mlama1.1").rglob("*.jsonl")]
    bundled += [REPO / "resources" / "mlama-mini" / "mlama1.1" / lang / "templates.jsonl"
                for lang in ("en", "zh")]
    assert len(bundled) == 24
    for path in bundled:
        name = "mlama1.1/" + "/".join(path.parts[-2:])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[name], name


@pytest.mark.skipif(not (REPO.parent / "shared/data/mlama-en-zh/mlama1.1").is_dir(),
                    reason="the complete mLAMA en/zh copy ../shared/data/mlama-en-zh is absent")
def test_the_shipped_list_verifies_the_complete_copy(tmp_path):
    root = REPO.parent / "shared/data/mlama-en-zh"
    path = tmp_path / "full.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted((root / "mlama1.1").rglob("*.jsonl")):
            zf.write(file, str(file.relative_to(root)))
    assert verify_archive(path, SHIPPED, ["en", "zh"]) == len(read_checksums(SHIPPED))
