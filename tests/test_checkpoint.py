"""Checkpoints are bound to the content they depend on: model weights, inputs, options.

A job is "killed" after its records were checkpointed (its final write raises), something it
depends on changes, and the rerun must give the records of a clean run, never stale ones.
"""

from __future__ import annotations

import logging
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import build
from test_shards import facts_table

import kneurons.io
import kneurons.shards
from kneurons.checkpoint import Checkpoint, model_digest, open_checkpoint
from kneurons.shards import run_shard

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


class Killed(Exception):
    pass


def _die(*args, **kwargs):
    raise Killed


def save(lm, folder: Path) -> Path:
    """Save ``lm`` to ``folder``, replacing what was there (a retrained model, same path)."""
    shutil.rmtree(folder, ignore_errors=True)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models():
    return build("bert", seed=0), build("bert", seed=1)


SHARD = dict(part="evaluation", shard=0, n_shards=1, quadrature="riemann", keep_top=4,
             batch_queries=2)


def shard_records(lm, facts, out, identity, **options):
    run_shard(lm, facts, output=out, identity=identity, **{**SHARD, **options})
    return pd.read_parquet(out)


def killed_shard(monkeypatch, lm, facts, out, identity, **options):
    """Attribute, checkpoint every record, die before writing the shard."""
    with monkeypatch.context() as patch:
        patch.setattr(kneurons.shards, "write_shard", _die)
        with pytest.raises(Killed):
            run_shard(lm, facts, output=out, identity=identity, **{**SHARD, **options})
    assert list(Path(str(out) + ".checkpoint").glob("chunk-*.parquet"))


def other_facts():
    facts = facts_table()
    facts["sub_label"] = list(reversed(facts["sub_label"]))
    return facts


@pytest.mark.parametrize("change", ["weights", "steps", "method", "facts"])
def test_a_resumed_shard_after_a_change_equals_a_clean_run(models, tmp_path, monkeypatch, caplog,
                                                            change):
    a, b = models
    folder = save(a, tmp_path / "model")
    identity = {"source": str(folder), "arch": "masked", "revision": None}
    options = dict(method="amig", steps=3)
    out = tmp_path / "shard-0.parquet"
    killed_shard(monkeypatch, a, facts_table(), out, identity, **options)
    lm, facts = a, facts_table()
    if change == "weights":
        lm = b
        save(b, folder)
    elif change == "facts":
        facts = other_facts()
    else:
        options = {"steps": dict(method="amig", steps=4), "method": dict(method="ig", steps=3)}[change]
    caplog.set_level(logging.INFO)
    resumed = shard_records(lm, facts, out, identity, **options)
    clean_folder = save(lm, tmp_path / "clean-model")
    clean = shard_records(lm, facts, tmp_path / "clean.parquet", {**identity, "source": str(clean_folder)},
                          **options)
    pd.testing.assert_frame_equal(resumed, clean)
    part = {"weights": "model_weights", "steps": "options", "method": "options",
            "facts": "input candidates"}[change]
    assert f"{part} changed" in caplog.text and "resuming" not in caplog.text


def test_an_unchanged_shard_resumes(models, tmp_path, monkeypatch, caplog):
    a, _ = models
    folder = save(a, tmp_path / "model")
    identity = {"source": str(folder), "arch": "masked", "revision": None}
    out = tmp_path / "shard-0.parquet"
    killed_shard(monkeypatch, a, facts_table(), out, identity, method="amig", steps=3)
    caplog.set_level(logging.INFO)
    resumed = shard_records(a, facts_table(), out, identity, method="amig", steps=3)
    assert f"resuming after {len(resumed)} of {len(resumed)} records" in caplog.text
    assert "stale" not in caplog.text


def test_model_digest_follows_the_weights_not_the_path(models, tmp_path):
    a, b = models
    folder = save(a, tmp_path / "model")
    first = model_digest(folder)
    assert model_digest(folder) == first
    save(b, folder)
    assert model_digest(folder) != first


def test_hub_snapshots_are_digested_by_their_blob_names(tmp_path, monkeypatch):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (blobs / "sha-1").write_bytes(b"weights one")
    (snapshot / "model.safetensors").symlink_to(blobs / "sha-1")
    monkeypatch.setattr("kneurons.checkpoint._hub_snapshot", lambda repo, revision: snapshot)
    first = model_digest("org/model")
    (blobs / "sha-2").write_bytes(b"weights two")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(blobs / "sha-2")
    assert model_digest("org/model") != first


def test_open_checkpoint_names_what_changed(tmp_path, caplog):
    data = tmp_path / "input.txt"
    data.write_text("one")
    Checkpoint(tmp_path / "ckpt", "old string fingerprint").append(pd.DataFrame({"x": [1]}))
    caplog.set_level(logging.INFO)
    ckpt = open_checkpoint(tmp_path / "ckpt", options={"k": 1}, files={"data": data})
    assert "its fingerprint differs" in caplog.text and ckpt.load() is None
    ckpt.append(pd.DataFrame({"x": [1]}))
    assert open_checkpoint(tmp_path / "ckpt", options={"k": 1}, files={"data": data}).load() is not None
    data.write_text("two")
    assert open_checkpoint(tmp_path / "ckpt", options={"k": 1}, files={"data": data}).load() is None
    assert "input data changed" in caplog.text


# ---- the DKN rule script: its checkpoint glue, run with a stand-in for the snakemake object ----


class Namespace(dict):
    __getattr__ = dict.__getitem__


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level, hook = root.handlers[:], root.level, sys.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook = hook


def run_detect_dkn(folder, attribution, facts, out, log):
    snakemake = Namespace(
        log=[str(log)], threads=1,
        output=Namespace(dkn=str(out), activation=str(out).replace(".parquet", ".activation.npz")),
        input=Namespace(attribution=str(attribution), facts=str(facts), model=str(folder)),
        params=Namespace(model={"source": str(folder), "arch": "masked", "revision": None,
                                "trust_remote_code": False, "toy": True},
                         science={"kn_threshold": 0.2, "max_kn": 3, "single_drop": 0.2,
                                  "pair_drop": 0.25, "version": 2}))
    runpy.run_path(str(SCRIPTS / "detect_dkn.py"), init_globals={"snakemake": snakemake})


def dkn_inputs(lm, folder, tmp_path, name, method):
    facts = pd.concat([facts_table(8)] * 3, ignore_index=True)  # 24 queries: a chunk of 16
    facts["uuid"] = [f"u{i}" for i in range(len(facts))]
    facts["lineid"] = range(len(facts))
    facts.to_parquet(tmp_path / "facts.parquet")
    attribution = tmp_path / f"{name}.parquet"
    run_shard(lm, facts, part="discovery", shard=0, n_shards=1, method=method, steps=3,
              quadrature="riemann", keep_top=6, output=attribution,
              identity={"source": str(folder)})
    return attribution, tmp_path / "facts.parquet"


@pytest.mark.parametrize("change", ["weights", "attribution"])
def test_a_resumed_dkn_job_after_a_change_equals_a_clean_run(models, tmp_path, monkeypatch,
                                                              restore_logging, change):
    a, b = models
    folder = save(a, tmp_path / "model")
    attribution, facts = dkn_inputs(a, folder, tmp_path, "amig", "amig")
    out = tmp_path / "dkn" / "shard-0.parquet"
    with monkeypatch.context() as patch:  # killed after its checkpoint, before its output
        patch.setattr(kneurons.io, "write_parquet", _die)
        with pytest.raises(Killed):
            run_detect_dkn(folder, attribution, facts, out, tmp_path / "killed.log")
    assert list(Path(str(out) + ".checkpoint").glob("chunk-*.parquet"))
    stale = pd.read_parquet(next(Path(str(out) + ".checkpoint").glob("chunk-*.parquet")))
    if change == "weights":
        save(b, folder)
    else:  # attribution redone with another method at the same path
        attribution, _ = dkn_inputs(a, folder, tmp_path, "amig", "ig")
    run_detect_dkn(folder, attribution, facts, out, tmp_path / "resumed.log")
    clean_out = tmp_path / "clean" / "shard-0.parquet"
    run_detect_dkn(folder, attribution, facts, clean_out, tmp_path / "clean.log")
    resumed, clean = pd.read_parquet(out), pd.read_parquet(clean_out)
    # the change matters: the stale rows differ from the clean ones
    assert not stale.equals(clean.iloc[:len(stale)].reset_index(drop=True))
    pd.testing.assert_frame_equal(resumed, clean)
    # the activation statistics of the same queries: every non-calibration fact, once
    with np.load(str(out).replace(".parquet", ".activation.npz")) as stats:
        assert stats["relations"].tolist() == ["P1", "P2"]
        assert stats["counts"].sum() == len(clean) == 18  # 24 facts, 6 of them calibration
        assert stats["sums"].shape == (2, a.n_layers, a.d_ff) and (stats["sums"] > 0).all()
    log = (tmp_path / "resumed.log").read_text()
    part = {"weights": "model_weights", "attribution": "input attribution"}[change]
    assert f"{part} changed" in log


def test_model_identity_changes_with_the_weights_and_is_cached(tmp_path):
    import os

    from kneurons import checkpoint as ck

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights one")
    (folder / "config.json").write_text("{}")
    cache = tmp_path / "cache.json"
    first = ck.model_identity(folder, cache=cache)
    assert first == ck.model_digest(folder) and cache.is_file()
    calls = []
    real = ck.model_digest
    ck_digest = lambda *a, **k: calls.append(a) or real(*a, **k)  # noqa: E731
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "model_digest", ck_digest)
        assert ck.model_identity(folder, cache=cache) == first and calls == []  # cached
        (folder / "model.safetensors").write_bytes(b"weights two")  # replaced in place
        os.utime(folder / "model.safetensors", ns=(1, 1))
        second = ck.model_identity(folder, cache=cache)
    assert second != first and len(calls) == 1
