"""Resumable jobs: completed records are appended to a checkpoint folder as they are made.

A job killed at any point (even SIGKILL) and started again resumes from the last chunk that was
fully written; chunks are written atomically, so a chunk is either complete or absent. The folder
carries a fingerprint of the job's inputs and parameters: a checkpoint made for other inputs or
parameters is discarded, never mixed in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from .io import write_json, write_parquet


class Checkpoint:
    """Append-only chunks of a table under ``folder``, valid for one ``fingerprint``."""

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        meta = self.folder / "fingerprint.json"
        if self.folder.exists():
            stale = not meta.exists() or json.loads(meta.read_text())["fingerprint"] != fingerprint
            if stale:
                shutil.rmtree(self.folder)
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            write_json({"fingerprint": fingerprint}, meta)

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
