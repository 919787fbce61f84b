"""``kneurons attribute`` in-process, on tiny models saved to a temp folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import build
from kneurons.attribution import attribute
from kneurons.cli import main
from kneurons.queries import encode_prompt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for kind in ("bert", "gpt2"):
        lm = build(kind)
        path = tmp_path_factory.mktemp(kind)
        lm.model.save_pretrained(path)
        lm.tokenizer.save_pretrained(path)
        out[kind] = (lm, path)
    return out


@pytest.mark.parametrize("kind,arch", [("bert", "masked"), ("gpt2", "causal")])
def test_single_prompt(kind, arch, saved, tmp_path, capsys):
    lm, path = saved[kind]
    out = tmp_path / "scores.npy"
    prompt = "The capital of Tanzania is [MASK] ."
    rc = main(["attribute", "--model", str(path), "--arch", arch, "--prompt", prompt,
               "--target", "Dodoma", "--method", "ig", "--steps", "4", "--out", str(out),
               "--top", "3", "--threads", "1", "--quadrature", "gauss-legendre"])
    assert rc == 0
    scores = np.load(out)
    assert scores.dtype == np.float32 and scores.shape == (lm.n_layers, lm.d_ff)
    (ref,) = attribute(lm, [encode_prompt(lm, prompt, "Dodoma")], method="ig", steps=4,
                       quadrature="gauss-legendre")
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-5, atol=1e-7)
    text = capsys.readouterr().out
    assert f"P(target) = {ref.prob:.6g}" in text
    flat = np.argmax(ref.scores)
    layer, neuron = divmod(int(flat), lm.d_ff)
    lines = [ln for ln in text.splitlines() if ln and ln[0].isdigit()]
    assert len(lines) == 3 and lines[0].startswith(f"{layer}\t{neuron}\t")


def test_queries_file(saved, tmp_path):
    lm, path = saved["bert"]
    rows = [{"prompt": "The capital of Tanzania is [MASK] .", "target": "Dodoma"},
            {"prompt": "[MASK] is the capital of France .", "target": "Paris"},
            {"prompt": "坦桑尼亚的官方语言是[MASK]。", "target": "斯瓦希里语"}]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                     encoding="utf-8")
    out = tmp_path / "out"
    assert main(["attribute", "--model", str(path), "--arch", "masked", "--queries", str(qfile),
                 "--steps", "3", "--out", str(out)]) == 0
    timings = json.loads((out / "timings.json").read_text())
    assert len(timings["seconds"]) == 3 and all(s > 0 for s in timings["seconds"])
    for i, r in enumerate(rows):
        (ref,) = attribute(lm, [encode_prompt(lm, r["prompt"], r["target"])], steps=3)
        np.testing.assert_allclose(np.load(out / f"{i}.npy"), ref.scores, rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in out.iterdir()) == ["0.npy", "1.npy", "2.npy", "timings.json"]


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "The capital of Tanzania is [MASK] ."}', "line 2: field 'target' is missing"),
    ('{"prompt": "no marker", "target": "x"}', "line 2: field 'prompt'"),
    ('{"prompt": "a [MASK]", "target": 3}', "line 2: field 'target' must be"),
    ('not json', "line 2: invalid JSON"),
    ('["a", "b"]', "line 2: expected a JSON object"),
])
def test_bad_jsonl_line(line, needle, saved, tmp_path, capsys):
    qfile = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "The capital of Tanzania is [MASK] .", "target": "Dodoma"})
    qfile.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as ex:
        main(["attribute", "--model", str(saved["bert"][1]), "--arch", "masked",
              "--queries", str(qfile), "--out", str(tmp_path / "o")])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert str(qfile) in err and needle in err
    assert not (tmp_path / "o").exists()


def test_usage_errors(saved, capsys):
    path = str(saved["bert"][1])
    with pytest.raises(SystemExit):
        main(["attribute", "--model", path, "--arch", "masked", "--prompt", "a [MASK]"])
    assert "--target" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["attribute", "--model", path, "--arch", "masked", "--prompt", "a", "--target", "b"])
    assert "marker" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["attribute", "--model", path, "--arch", "decoder", "--prompt", "a [MASK]"])


def test_site_and_autocast_options_reach_the_engine(saved, tmp_path):
    lm, path = saved["gpt2"]
    prompt = "The capital of Tanzania is [MASK] ."
    for extra, opts in [(["--site", "pre", "--quadrature", "linspace"],
                         dict(site="pre", quadrature="linspace")),
                        (["--autocast"], dict(autocast=True))]:
        out = tmp_path / "scores.npy"
        assert main(["attribute", "--model", str(path), "--arch", "causal", "--prompt", prompt,
                     "--target", "Dodoma", "--method", "ig", "--steps", "3", "--out", str(out),
                     *extra]) == 0
        (ref,) = attribute(lm, [encode_prompt(lm, prompt, "Dodoma")], method="ig", steps=3,
                           **opts)
        (default,) = attribute(lm, [encode_prompt(lm, prompt, "Dodoma")], method="ig", steps=3)
        np.testing.assert_allclose(np.load(out), ref.scores, rtol=1e-5, atol=1e-7)
        assert not np.allclose(ref.scores, default.scores, rtol=1e-6, atol=0)
