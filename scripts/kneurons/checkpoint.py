"""Resumable jobs: completed records are appended to a checkpoint folder as they are made.

A job killed at any point (even SIGKILL) and started again resumes from the last chunk that was
fully written; chunks are written atomically, so a chunk is either complete or absent. The folder
carries a fingerprint of everything the records depend on: the model's weights (a digest of its
files), the input content and every option. A checkpoint made for other weights, inputs or
options is discarded with a log line naming what changed, never mixed in.
``open_checkpoint`` computes that fingerprint; every resumable job opens its checkpoint with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from .io import file_sha256, write_json, write_parquet

log = logging.getLogger(__name__)


class Checkpoint:
    """Append-only chunks of a table under ``folder``, valid for one ``fingerprint``.

    ``fingerprint`` is a string or a {part: digest} mapping; with a mapping, the log line of a
    discarded checkpoint names the parts that differ.
    """

    def __init__(self, folder: str | Path, fingerprint: str | Mapping[str, str]):
        self.folder = Path(folder)
        self.fingerprint = fingerprint if isinstance(fingerprint, str) else dict(fingerprint)
        meta = self.folder / "fingerprint.json"
        if self.folder.exists():
            old = json.loads(meta.read_text())["fingerprint"] if meta.exists() else None
            if old != self.fingerprint:
                log.warning("discarding the stale checkpoint %s: %s", self.folder,
                            _why_stale(old, self.fingerprint))
                shutil.rmtree(self.folder)
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            write_json({"fingerprint": self.fingerprint}, meta)

    def _chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.parquet"))

    def load(self) -> pd.DataFrame | None:
        """All records written so far (None when there are none)."""
        chunks = self._chunks()
        if not chunks:
            return None
        return pd.concat([pd.read_parquet(path) for path in chunks], ignore_index=True)

    def append(self, records: pd.DataFrame) -> None:
        """Write ``records`` as the next chunk."""
        write_parquet(records, self.folder / f"chunk-{len(self._chunks()):06d}.parquet")

    def remove(self) -> None:
        """Delete the checkpoint (after the final output has been written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _why_stale(old, new) -> str:
    if old is None:
        return "it has no fingerprint"
    if isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        return f"{', '.join(changed)} changed"
    return "its fingerprint differs"


def open_checkpoint(
    folder: str | Path,
    *,
    options: Mapping,
    model: Mapping | None = None,
    files: Mapping[str, str | Path] | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
) -> Checkpoint:
    """The checkpoint under ``folder``, bound to every thing the job's records depend on.

    ``options``: every option of the job (plain values); ``model``: the model's identity as in
    the rules' ``model`` params (``source``: a local folder or a hub id, ``revision``), whose
    weights enter as a digest of its files (``model_digest``); ``files``: input files, by
    content; ``tables``: in-memory inputs, by content. Each becomes one part of the fingerprint.
    """
    parts = {"options": _digest_bytes(json.dumps(options, sort_keys=True, default=str).encode())}
    if model is not None:
        parts["model"] = _digest_bytes(json.dumps(dict(model), sort_keys=True, default=str).encode())
        parts["model_weights"] = model_digest(model["source"], model.get("revision"))
    for name, path in (files or {}).items():
        parts[f"input {name}"] = file_sha256(path)
    for name, table in (tables or {}).items():
        parts[f"input {name}"] = table_digest(table)
    return Checkpoint(folder, parts)


def _digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def table_digest(table: pd.DataFrame) -> str:
    """A digest of a table's columns and values (not its index)."""
    digest = hashlib.sha256(json.dumps([str(c) for c in table.columns]).encode())
    hashable = table.map(lambda v: repr(v) if isinstance(v, (list, dict, bytes)) else v)
    digest.update(pd.util.hash_pandas_object(hashable, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def model_digest(source: str | Path, revision: str | None = None) -> str:
    """A digest of a model's files: a local folder's files by content, a hub id's resolved
    snapshot in the local cache (its files are links to content-addressed blobs, so the blob
    names stand for the content). A hub id that is not cached yet has no files to digest: its
    digest is then the empty one, and the job has to load (download) the model before."""
    folder = Path(source)
    if not folder.is_dir():
        folder = _hub_snapshot(str(source), revision)
        if folder is None:
            return "no local files"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name.startswith("."):  # e.g. .cache/ of huggingface_hub downloads
            continue
        target = Path(os.path.realpath(path))
        content = target.name if target.parent.name == "blobs" else file_sha256(path)
        digest.update(f"{name}\0{content}\n".encode())
    return digest.hexdigest()


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 (not in the cache, or not a hub id)
        return None


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a hub id (at ``revision``) resolves to: its snapshot in the local cache, else
    the hub (unless ``HF_HUB_OFFLINE``); None when neither answers."""
    snapshot = _hub_snapshot(repo_id, revision)
    if snapshot is not None:
        return snapshot.name  # snapshots/<commit>
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
    except Exception:  # noqa: BLE001 (no network, no such model)
        return None


def model_identity(source: str | Path, revision: str | None = None, *,
                   cache: str | Path | None = None) -> str:
    """What a plan binds a model's jobs to, so that other weights rerun them: a local folder's
    content digest (:func:`model_digest`), its files hashed again only when a file's size or
    modification time changed (``cache``: a JSON file of earlier digests keyed by path, size
    and mtime; e.g. under .snakemake/), so that every plan costs no gigabytes of reading; a hub
    id's commit (:func:`hub_commit`), or ``unresolved`` when it is neither cached nor reachable
    (its jobs then rerun once it resolves)."""
    folder = Path(source)
    if not folder.is_dir():
        commit = hub_commit(str(source), revision)
        return f"hub commit {commit}" if commit else "unresolved"
    if cache is None:
        return model_digest(source, revision)
    stamp = sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.rglob("*") if p.is_file())
    key = hashlib.sha256(json.dumps([str(folder.resolve()), stamp]).encode()).hexdigest()
    cache = Path(cache)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = model_digest(source, revision)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    return known[key]
