"""IG / AMIG attribution engine against captum, an independent naive loop and completeness.

The references here never use the engine's registry or hooks: they hook the FFN modules by
hard-coded attribute paths and run the full model, one interpolation point per forward.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients

from kneurons.attribution import METHODS, Attribution, attribute, probability_gap, quadrature_rule
from kneurons.neurons import knowledge_neurons
from kneurons.queries import EncodedQuery, encode_query

EN = "The capital of [X] is [Y] ."
ZH = "[X]的官方语言是[Y]。"
CAPTUM_METHOD = {"riemann": "riemann_middle", "gauss-legendre": "gausslegendre"}


# ----------------------------------------------------------------------------- references
def raw_site(lm, layer: int, site: str = "post"):
    """(module, is_input) holding the FFN activation, by hard-coded attribute path."""
    m, t = lm.model, lm.spec.model_type
    if t == "bert":
        blk = m.bert.encoder.layer[layer]
        return (blk.output.dense, True) if site == "post" else (blk.intermediate.dense, False)
    if t == "roberta":
        return m.roberta.encoder.layer[layer].output.dense, True
    if t == "gpt2":
        blk = m.transformer.h[layer]
        return (blk.mlp.c_proj, True) if site == "post" else (blk.mlp.c_fc, False)
    if t in ("llama", "gemma3_text"):
        return m.model.layers[layer].mlp.down_proj, True
    if t == "gpt_neox":
        return m.gpt_neox.layers[layer].mlp.dense_4h_to_h, True
    raise NotImplementedError(t)


def run_with(lm, ids: torch.Tensor, layer: int, site: str, fn):
    """Full forward of ids [N, S] with act := fn(act) at (layer, site); logits [N, S, V]."""
    mod, is_input = raw_site(lm, layer, site)
    if is_input:
        h = mod.register_forward_pre_hook(lambda m, a: (fn(a[0]),))
    else:
        h = mod.register_forward_hook(lambda m, a, out: fn(out))
    try:
        return lm.model(input_ids=ids).logits
    finally:
        h.remove()


def activation(lm, ids: list[int], layer: int, pos: int, site: str = "post") -> torch.Tensor:
    seen = {}

    def keep(act):
        seen["a"] = act[0, pos].detach().clone()
        return act
    with torch.no_grad():
        run_with(lm, torch.tensor([ids]), layer, site, keep)
    return seen["a"]  # [d_ff]


def prob_fn(lm, q: EncodedQuery, layer: int, t: int, site: str = "post"):
    """x [N, d_ff] -> P(object token t) [N], activation at (layer, its position) := x."""
    pos, tgt = q.target_positions[t], q.target_ids[t]
    ids = torch.tensor([q.input_ids])

    def f(x):
        def put(act):
            act = act.clone()
            act[:, pos] = x.to(act.dtype)
            return act
        logits = run_with(lm, ids.expand(x.shape[0], -1), layer, site, put)
        return torch.softmax(logits[:, pos].float(), -1)[:, tgt]
    return f


def baselines(lm, q: EncodedQuery, layer: int, t: int, method: str, site: str = "post"):
    if method == "ig":
        return [torch.zeros(lm.d_ff)]
    repl = lm.tokenizer.mask_token_id if lm.arch == "masked" else lm.tokenizer.eos_token_id
    out = []
    for i in q.query_positions:
        ids = list(q.input_ids)
        ids[i] = repl
        out.append(activation(lm, ids, layer, q.target_positions[t], site))
    return out


def naive_scores(lm, q: EncodedQuery, method: str, steps: int, quad: str = "riemann",
                 site: str = "post") -> np.ndarray:
    """One layer, one baseline, one interpolation point per full forward."""
    alphas, weights = quadrature_rule(steps, quad)
    scores = np.zeros((lm.n_layers, lm.d_ff))
    for layer in range(lm.n_layers):
        for t in range(len(q.target_ids)):
            f = prob_fn(lm, q, layer, t, site)
            a = activation(lm, q.input_ids, layer, q.target_positions[t], site)
            bs = baselines(lm, q, layer, t, method, site)
            for b in bs:
                total = torch.zeros(lm.d_ff, dtype=torch.float64)
                for alpha, w in zip(alphas, weights):
                    x = (b + float(alpha) * (a - b))[None].requires_grad_(True)
                    (g,) = torch.autograd.grad(f(x).sum(), x)
                    total += w * g[0].double()
                scores[layer] += ((a - b).double() * total).numpy() / (len(bs) * len(q.target_ids))
    return scores


def expected_sums(lm, q: EncodedQuery, method: str) -> np.ndarray:
    """Per layer: mean over object tokens (and baselines) of P(a) - P(a')."""
    out = np.zeros(lm.n_layers)
    with torch.no_grad():
        for layer in range(lm.n_layers):
            for t in range(len(q.target_ids)):
                f = prob_fn(lm, q, layer, t)
                a = activation(lm, q.input_ids, layer, q.target_positions[t])
                bs = baselines(lm, q, layer, t, method)
                diffs = [f(a[None]).item() - f(b[None]).item() for b in bs]
                out[layer] += np.mean(diffs) / len(q.target_ids)
    return out


def argmax_query(lm, template: str, subject: str, target: str) -> EncodedQuery:
    """The query with the model's own prediction as object (decent probabilities)."""
    q = encode_query(lm, template, subject, target)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([q.input_ids])).logits[0]
    pred = [int(logits[p].argmax()) for p in q.target_positions[:1]]
    if lm.arch == "masked":
        ids = list(q.input_ids)
        ids[q.target_positions[0]] = lm.tokenizer.mask_token_id
        return EncodedQuery(ids, pred, q.target_positions[:1], q.query_positions)
    n = q.target_positions[0] + 1
    return EncodedQuery(q.input_ids[:n], pred, [n - 1], q.query_positions)


def pearson(x, y) -> float:
    return float(np.corrcoef(np.ravel(x), np.ravel(y))[0, 1])


def without_head(lm):
    """Same model, generic fallback path (full model with hooks)."""
    return dataclasses.replace(lm, spec=dataclasses.replace(lm.spec, head=None))


def build_gemma3(seed: int = 0, **overrides):
    from conftest import build

    return build("gemma3_text", seed, **overrides)


def build_gemma2(seed: int = 0):
    from conftest import build

    return build("gemma2", seed)


@pytest.fixture(scope="module")
def tiny_gemma3():
    return build_gemma3()  # sliding window 4 < query lengths: the full-block path


@pytest.fixture(scope="module")
def tiny_gemma3_wide():
    return build_gemma3(sliding_window=64)  # every query inside the window: one-position path


def test_gemma3_head_applies_the_logit_softcap(tiny_gemma3):
    # the registry's head on the last block's output gives the model's own (softcapped) logits
    lm = tiny_gemma3
    ids = torch.as_tensor([encode_query(lm, EN, "Tanzania", "Dodoma").input_ids])
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits  # [1, S, V]
        got = lm.spec.head(lm.model, _last_hidden(lm, ids))
        uncapped = lm.model.lm_head(lm.model.model.norm(_last_hidden(lm, ids)))
    assert ref.abs().max() < 3.0 < uncapped.abs().max()  # the cap is active
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _last_hidden(lm, ids: torch.Tensor) -> torch.Tensor:
    """The last block's output (before the final norm), by a hook on the block."""
    seen = {}
    h = lm.blocks()[-1].register_forward_hook(
        lambda m, a, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        h.remove()
    return seen["h"]


# ----------------------------------------------------------------------------- captum
@pytest.mark.parametrize("quad", sorted(CAPTUM_METHOD))
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def test_ig_matches_captum(name, quad, request):
    lm = request.getfixturevalue(name)
    q = argmax_query(lm, EN, "Tanzania", "Dodoma")
    steps = 16
    (res,) = attribute(lm, [q], method="ig", steps=steps, quadrature=quad)
    for layer in range(lm.n_layers):
        a = activation(lm, q.input_ids, layer, q.target_positions[0])
        ig = IntegratedGradients(prob_fn(lm, q, layer, 0))
        ref = ig.attribute(a[None], baselines=torch.zeros(1, lm.d_ff), n_steps=steps,
                           method=CAPTUM_METHOD[quad])[0].detach().numpy()
        assert pearson(res.scores[layer], ref) >= 0.9999
        assert np.abs(res.scores[layer] - ref).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("name,site", [("tiny_bert", "post"), ("tiny_gpt2", "pre"),
                                       ("tiny_llama", "post")])
def test_linspace_rule_matches_the_knowledge_neurons_library_formula(name, site, request):
    # the knowledge-neurons library (and Dai et al.'s code): alphas = linspace(0, 1, m),
    # score = a * sum_k dP/da(alpha_k a) / m, written out here with plain autograd
    lm = request.getfixturevalue(name)
    q = argmax_query(lm, EN, "Tanzania", "Dodoma")
    steps = 7
    (res,) = attribute(lm, [q], method="ig", steps=steps, quadrature="linspace", site=site)
    for layer in range(lm.n_layers):
        a = activation(lm, q.input_ids, layer, q.target_positions[0], site=site)
        x = (torch.linspace(0, 1, steps)[:, None] * a[None]).requires_grad_(True)
        (grad,) = torch.autograd.grad(prob_fn(lm, q, layer, 0, site=site)(x).sum(), x)
        ref = (a * grad.sum(0) / steps).numpy()
        assert pearson(res.scores[layer], ref) >= 0.99999
        assert np.abs(res.scores[layer] - ref).max() <= 1e-4 * np.abs(ref).max()
    assert quadrature_rule(5, "linspace")[0].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_pre_activation_site_matches_captum(tiny_gpt2):
    lm = tiny_gpt2
    q = argmax_query(lm, EN, "Tanzania", "Dodoma")
    (res,) = attribute(lm, [q], method="ig", steps=12, site="pre")
    (post,) = attribute(lm, [q], method="ig", steps=12)
    for layer in range(lm.n_layers):
        a = activation(lm, q.input_ids, layer, q.target_positions[0], site="pre")
        ig = IntegratedGradients(prob_fn(lm, q, layer, 0, site="pre"))
        ref = ig.attribute(a[None], baselines=torch.zeros(1, lm.d_ff), n_steps=12,
                           method="riemann_middle")[0].detach().numpy()
        assert pearson(res.scores[layer], ref) >= 0.9999
        assert np.abs(res.scores[layer] - ref).max() <= 1e-3 * np.abs(ref).max()
    assert not np.allclose(res.scores, post.scores, atol=1e-2 * np.abs(post.scores).max())


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def test_amig_is_mean_of_captum_ig_over_token_baselines(name, request):
    lm = request.getfixturevalue(name)
    q = argmax_query(lm, EN, "Tanzania", "Dodoma")
    (res,) = attribute(lm, [q], method="amig", steps=10)
    for layer in range(lm.n_layers):
        a = activation(lm, q.input_ids, layer, q.target_positions[0])
        ig = IntegratedGradients(prob_fn(lm, q, layer, 0))
        refs = [ig.attribute(a[None], baselines=b[None], n_steps=10,
                             method="riemann_middle")[0].detach().numpy()
                for b in baselines(lm, q, layer, 0, "amig")]
        assert len(refs) == len(q.query_positions) > 1
        ref = np.mean(refs, axis=0)
        assert pearson(res.scores[layer], ref) >= 0.9999
        assert np.abs(res.scores[layer] - ref).max() <= 1e-3 * np.abs(ref).max()


# ----------------------------------------------------------------------------- completeness
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,template,subject,target", [
    ("tiny_bert", EN, "Tanzania", None),
    ("tiny_gpt2", EN, "Tanzania", None),
    ("tiny_bert", ZH, "坦桑尼亚", "斯瓦希里语"),      # zh, multi-token
    ("tiny_gpt2", "[X] is located in [Y] .", "Kilimanjaro", "Tanzania"),
    ("tiny_llama", EN, "Tanzania", None),
    ("tiny_llama", ZH, "坦桑尼亚", "斯瓦希里语"),
])
def test_completeness(name, template, subject, target, method, request):
    lm = request.getfixturevalue(name)
    q = (argmax_query(lm, template, subject, "Dodoma") if target is None
         else encode_query(lm, template, subject, target))
    exp = expected_sums(lm, q, method)
    assert np.abs(exp).max() > 1e-4  # a real check, not 0 == 0

    def close(res: Attribution) -> bool:
        got = res.scores.sum(axis=1)
        return bool(np.all(np.abs(got - exp) <= 0.01 * np.abs(exp) + 1e-6))

    (r200,) = attribute(lm, [q], method=method, steps=200)
    assert close(r200), (r200.scores.sum(axis=1), exp)
    (gl,) = attribute(lm, [q], method=method, steps=12, quadrature="gauss-legendre")
    assert close(gl), (gl.scores.sum(axis=1), exp)
    # the library's own convergence check computes the same targets
    np.testing.assert_allclose(probability_gap(lm, q, method=method), exp, rtol=1e-4,
                               atol=1e-7)


@pytest.mark.parametrize("template,subject,target", [
    (EN, "Tanzania", None), (ZH, "坦桑尼亚", None)])
def test_completeness_gemma3_amig(tiny_gemma3, template, subject, target):
    lm = tiny_gemma3
    q = (argmax_query(lm, template, subject, "Dodoma") if target is None
         else encode_query(lm, template, subject, target))
    exp = expected_sums(lm, q, "amig")
    assert np.abs(exp).max() > 1e-4
    np.testing.assert_allclose(probability_gap(lm, q, method="amig"), exp, rtol=1e-4, atol=1e-7)
    (gl,) = attribute(lm, [q], method="amig", steps=12, quadrature="gauss-legendre")
    got = gl.scores.sum(axis=1)
    assert np.all(np.abs(got - exp) <= 0.01 * np.abs(exp) + 1e-6), (got, exp)


def test_zero_baseline_is_degenerate_on_gemma3(tiny_gemma3):
    # Gemma normalises the FFN output (post_feedforward_layernorm) before the residual: the
    # block is invariant to scaling the activation, so P(alpha a) is flat for alpha > 0 and
    # jumps at 0. IG's integral misses the jump: completeness fails, whatever the steps.
    lm = tiny_gemma3
    q = argmax_query(lm, EN, "Tanzania", "Dodoma")
    layer, t = 1, 0
    a = activation(lm, q.input_ids, layer, q.target_positions[t])
    f = prob_fn(lm, q, layer, t)
    with torch.no_grad():
        flat = f(torch.stack([alpha * a for alpha in (0.05, 0.5, 1.0)]))
        at_zero = f(torch.zeros(1, lm.d_ff))
    assert float(flat.max() - flat.min()) < 1e-4 * float(flat.max())
    assert abs(float(at_zero[0] - flat[-1])) > 5e-3 * float(flat.max())  # the jump at 0
    gap = probability_gap(lm, q, method="ig")
    (res,) = attribute(lm, [q], method="ig", steps=50)
    error = np.abs(res.scores.sum(axis=1) - gap).sum() / np.abs(gap).sum()
    assert error > 0.5


# ----------------------------------------------------------------------------- engine
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,template,subject,target", [
    ("tiny_bert", "[X] is located in [Y] .", "Tanzania", "Kilimanjaro"),   # 3 masks
    ("tiny_gpt2", EN, "Tanzania", "Dodoma"),                              # multi-token causal
    ("tiny_llama", EN, "France", "Paris"),
])
def test_engine_equals_naive_loop(name, template, subject, target, method, request):
    lm = request.getfixturevalue(name)
    q = encode_query(lm, template, subject, target)
    assert len(q.target_ids) > 1
    (res,) = attribute(lm, [q], method=method, steps=3, batch_size=50)
    ref = naive_scores(lm, q, method, steps=3)
    assert np.abs(res.scores - ref).max() <= 1e-4 * np.abs(ref).max()
    assert pearson(res.scores, ref) >= 0.99999


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_roberta", "tiny_llama",
                                  "tiny_neox", "tiny_gemma3", "tiny_gemma3_wide"])
def test_fallback_path_equals_fast_path(name, request):
    lm = request.getfixturevalue(name)
    qs = [encode_query(lm, EN, "Tanzania", "Dodoma"),
          encode_query(lm, ZH, "坦桑尼亚", "斯瓦希里语")]
    fast = attribute(lm, qs, method="amig", steps=3, batch_size=64)
    slow = attribute(without_head(lm), qs, method="amig", steps=3, batch_size=64)
    for f, s in zip(fast, slow):
        assert np.isfinite(f.scores).all() and np.abs(f.scores).max() > 0
        np.testing.assert_allclose(f.scores, s.scores, rtol=0, atol=1e-5 * np.abs(s.scores).max())
        np.testing.assert_allclose(f.token_probs, s.token_probs, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_llama"])
def test_batching_and_padding_invariance(name, method, request):
    lm = request.getfixturevalue(name)
    qa = encode_query(lm, EN, "Tanzania", "Dodoma")
    others = [encode_query(lm, ZH, "坦桑尼亚", "斯瓦希里语"),
              encode_query(lm, "[X] is located in [Y] .", "Kilimanjaro", "Tanzania"),
              encode_query(lm, "The official language of [X] is [Y] .", "Tanzania", "Swahili")]
    assert len({len(q.input_ids) for q in [qa, *others]}) >= 3  # padding happens
    (alone,) = attribute(lm, [qa], method=method, steps=4)
    for bs in (None, 7, 1000):
        mixed = attribute(lm, [others[0], qa, *others[1:]], method=method, steps=4, batch_size=bs)
        tol = 1e-5 * np.abs(alone.scores).max()
        np.testing.assert_allclose(mixed[1].scores, alone.scores, rtol=0, atol=tol)
        np.testing.assert_allclose(mixed[1].token_probs, alone.token_probs, rtol=1e-5)
        (other_alone,) = attribute(lm, [others[0]], method=method, steps=4)
        np.testing.assert_allclose(mixed[0].scores, other_alone.scores, rtol=0,
                                   atol=1e-5 * np.abs(other_alone.scores).max())


@pytest.mark.parametrize("name,template,subject,target", [
    ("tiny_bert", "[X] is located in [Y] .", "Tanzania", "Kilimanjaro"),
    ("tiny_gpt2", EN, "Tanzania", "Dodoma"),
])
def test_multi_token_scores_are_mean_over_tokens(name, template, subject, target, request):
    lm = request.getfixturevalue(name)
    q = encode_query(lm, template, subject, target)
    singles = [EncodedQuery(q.input_ids, [y], [p], q.query_positions)
               for y, p in zip(q.target_ids, q.target_positions)]
    res = attribute(lm, [q, *singles], method="amig", steps=3)
    mean = np.mean([r.scores for r in res[1:]], axis=0)
    np.testing.assert_allclose(res[0].scores, mean, rtol=0, atol=1e-6 * np.abs(mean).max())
    np.testing.assert_allclose(res[0].token_probs, [r.token_probs[0] for r in res[1:]], rtol=1e-6)
    assert res[0].prob == pytest.approx(float(np.mean(res[0].token_probs)))
    assert not np.allclose(res[1].scores, res[2].scores)


def test_probability_rank_and_predicted(tiny_bert, tiny_gpt2):
    # masked: direct softmax at the mask
    q = encode_query(tiny_bert, EN, "Tanzania", "Dodoma")
    with torch.no_grad():
        logits = tiny_bert.model(input_ids=torch.tensor([q.input_ids])).logits[0]
    logits = logits[q.target_positions[0]]
    (r,) = attribute(tiny_bert, [q], method="ig", steps=2)
    expected = torch.softmax(logits, -1)[q.target_ids[0]].item()
    assert r.token_probs[0] == pytest.approx(expected, rel=1e-5)
    assert r.rank == int((logits > logits[q.target_ids[0]]).sum()) + 1
    assert r.predicted == (r.rank == 1)
    # causal: greedy continuation is predicted, with rank 1
    lm = tiny_gpt2
    prefix = lm.tokenizer("The capital of Tanzania is")["input_ids"]
    ids = list(prefix)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = EncodedQuery(ids[:-1], ids[len(prefix):], [len(prefix) - 1 + t for t in range(3)],
                          list(range(len(prefix))))
    wrong = dataclasses.replace(greedy, target_ids=greedy.target_ids[:2] + [(ids[-1] + 1) % 50])
    rg, rw = attribute(lm, [greedy, wrong], method="ig", steps=2)
    assert rg.predicted and rg.rank == 1 and not rw.predicted and rw.rank == 1
    assert rg.token_probs.shape == (3,) and rg.prob == pytest.approx(float(rg.token_probs.mean()))


def test_object_first_templates(tiny_bert, tiny_gpt2):
    qm = encode_query(tiny_bert, "[Y] is the capital of [X] .", "Tanzania", "Dodoma")
    (rm,) = attribute(tiny_bert, [qm], method="amig", steps=3)
    np.testing.assert_allclose(rm.scores, naive_scores(tiny_bert, qm, "amig", 3), rtol=0,
                               atol=1e-4 * np.abs(rm.scores).max())
    qc = encode_query(tiny_gpt2, "[Y] is the capital of [X] .", "Tanzania", "Dodoma")
    (rc,) = attribute(tiny_gpt2, [qc], method="ig", steps=3)
    assert np.isfinite(rc.scores).all() and np.abs(rc.scores).max() > 0
    with pytest.raises(ValueError, match="no query tokens"):
        attribute(tiny_gpt2, [qc], method="amig", steps=3)


def test_layer_subset(tiny_bert):
    q = encode_query(tiny_bert, EN, "Tanzania", "Dodoma")
    (full,) = attribute(tiny_bert, [q], method="amig", steps=3)
    (sub,) = attribute(tiny_bert, [q], method="amig", steps=3, layers=[1])
    assert sub.scores.shape == (tiny_bert.n_layers, tiny_bert.d_ff)
    assert not sub.scores[[0, 2]].any()
    np.testing.assert_allclose(sub.scores[1], full.scores[1], rtol=0,
                               atol=1e-6 * np.abs(full.scores[1]).max())


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_llama"])
def test_autocast_runs_close_to_float32(name, request):
    lm = request.getfixturevalue(name)
    q = encode_query(lm, EN, "Tanzania", "Dodoma")
    (ref,) = attribute(lm, [q], method="amig", steps=4)
    (bf,) = attribute(lm, [q], method="amig", steps=4, autocast=True)
    assert bf.scores.dtype == np.float32
    assert pearson(bf.scores, ref.scores) > 0.9


def test_bad_arguments(tiny_bert, tiny_llama):
    q = encode_query(tiny_bert, EN, "Tanzania", "Dodoma")
    with pytest.raises(ValueError, match="method"):
        attribute(tiny_bert, [q], method="deeplift")
    with pytest.raises(ValueError, match="quadrature"):
        attribute(tiny_bert, [q], quadrature="simpson")
    with pytest.raises(ValueError, match="layers"):
        attribute(tiny_bert, [q], layers=[5])
    ql = encode_query(tiny_llama, EN, "Tanzania", "Dodoma")
    with pytest.raises(ValueError, match="gated"):
        attribute(tiny_llama, [ql], site="pre")


def test_quadrature_rules_integrate_polynomials():
    a, w = quadrature_rule(5, "gauss-legendre")
    assert np.sum(w * a ** 9) == pytest.approx(0.1, rel=1e-12)  # exact to degree 9
    a, w = quadrature_rule(4, "riemann")
    np.testing.assert_allclose(a, [0.125, 0.375, 0.625, 0.875])
    assert w.sum() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- shared passes
def _candidates_of(lm, case: str):
    """A fact's true and wrong candidates (same template and subject), as the shards pass them."""
    if case == "one-token":  # same input: a masked LM's one mask, a causal LM's prefix
        true = encode_query(lm, EN, "Tanzania", "Tanzania")
        wrong = dataclasses.replace(true, target_ids=[(true.target_ids[0] + 7) % 50 + 5])
        return [true, wrong]
    if case == "same-length":  # masked: three masks each
        return [encode_query(lm, "[X] is located in [Y] .", "Tanzania", "dar es salaam"),
                encode_query(lm, "[X] is located in [Y] .", "Tanzania", "kilimanjaro")]
    if case == "longer-true":  # causal: the wrong object's input begins the true one's
        return [encode_query(lm, EN, "Tanzania", "Paris"),
                encode_query(lm, EN, "Tanzania", "Tanzania")]
    if case == "different":  # causal: the first two object tokens' positions are common (the
        # tiny BPE splits off the space: " Paris" = " ", "Par", "is"; " Berlin" = " ", "Ber"...)
        return [encode_query(lm, EN, "Tanzania", "Paris"),
                encode_query(lm, EN, "Tanzania", "Berlin")]
    raise ValueError(case)


def _count_rows(monkeypatch):
    """Spy on the engine: captured inputs and rows run."""
    import kneurons.attribution as attribution

    seen = {"captured": 0, "rows": 0}
    capture, run_rows = attribution._capture, attribution._run_rows

    def counting_capture(lm, queries, *a, **k):
        seen["captured"] += len(queries)
        return capture(lm, queries, *a, **k)

    def counting_rows(lm, grp, r_q, *a, **k):
        seen["rows"] += len(r_q)
        return run_rows(lm, grp, r_q, *a, **k)
    monkeypatch.setattr(attribution, "_capture", counting_capture)
    monkeypatch.setattr(attribution, "_run_rows", counting_rows)
    return seen


@pytest.mark.parametrize("layers", [None, [0, 2]])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,case,shared_units", [
    ("tiny_bert", "one-token", 1), ("tiny_bert", "same-length", 3),
    ("tiny_bert", "different-masks", 0), ("tiny_roberta", "one-token", 1),
    ("tiny_gpt2", "one-token", 1), ("tiny_gpt2", "longer-true", 1),
    ("tiny_gpt2", "different", 2), ("tiny_llama", "one-token", 1),
    ("tiny_llama", "longer-true", 1), ("tiny_neox", "one-token", 1),
    ("tiny_gemma3", "one-token", 1), ("tiny_gemma3", "different", 2),
    ("tiny_gemma3_wide", "one-token", 1), ("tiny_gemma3_wide", "different", 2),
    ("fallback-gpt2", "different", 2), ("fallback-bert", "same-length", 3),
])
def test_shared_passes_equal_separate_calls(name, case, shared_units, method, layers, request,
                                            monkeypatch):
    # a fact's candidates attributed together share the capture and baselines' passes and,
    # where an object token is read at the same position after the same input, its rows;
    # the scores are those of separate calls (float rounding apart)
    fallback = name.startswith("fallback-")
    lm = request.getfixturevalue("tiny_" + name.split("-")[1] if fallback else name)
    lm = without_head(lm) if fallback else lm
    if case == "different-masks":
        qs = [encode_query(lm, "[X] is located in [Y] .", "Tanzania", "dodoma"),
              encode_query(lm, "[X] is located in [Y] .", "Tanzania", "dar es salaam")]
    else:
        qs = _candidates_of(lm, case)
    layers = None if layers is None else [x for x in layers if x < lm.n_layers]
    kw = dict(method=method, steps=3, layers=layers)
    separate = [attribute(lm, [q], **kw)[0] for q in qs]
    seen = _count_rows(monkeypatch)
    together = attribute(lm, qs, **kw)
    for t, s in zip(together, separate):
        assert np.abs(s.scores).max() > 0
        np.testing.assert_allclose(t.scores, s.scores, rtol=0,
                                   atol=1e-5 * np.abs(s.scores).max())
        np.testing.assert_allclose(t.token_probs, s.token_probs, rtol=1e-6)
        assert (t.rank, t.predicted) == (s.rank, s.predicted)
    # what was shared: one captured input where the inputs are equal or one begins the
    # other (causal), and the rows of the shared object tokens ran once
    one_input = case in ("one-token", "same-length", "longer-true")
    assert seen["captured"] == (1 if one_input else 2)
    steps, n_l = 3, lm.n_layers if layers is None else len(layers)

    def n_rows(q, units):
        return units * (len(q.query_positions) if method == "amig" else 1) * n_l * steps
    unshared = sum(n_rows(q, len(q.target_ids)) for q in qs)
    assert seen["rows"] == unshared - n_rows(qs[0], shared_units)


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_roberta", "tiny_gpt2", "tiny_gemma3"])
def test_shared_head_gradients_equal_one_target_at_a_time(name, request):
    # K targets per row from one pass of the head: against _head_gradient per target and a
    # float64 softmax; rows with repeated targets, and peaked rows (P near 1), where
    # 1 - P must not cancel
    from kneurons.attribution import _head_gradient, _head_gradients

    lm = request.getfixturevalue(name)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, lm.model.config.hidden_size, generator=gen)
    hidden[6:] *= 40  # peaked
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    targets = torch.randint(0, vocab, (9, 3), generator=gen)
    targets[1, 2] = targets[1, 0]  # a repeated target
    targets[2, 1:] = targets[2, 0]
    with torch.no_grad():
        top = lm.spec.head(lm.model, hidden).argmax(-1)
    targets[6:, 0] = top[6:]
    got = _head_gradients(lm, hidden, targets)  # [K, R, hidden]
    model = copy.deepcopy(lm.model).double()
    for k in range(3):
        one = _head_gradient(lm, hidden, targets[:, k])
        np.testing.assert_allclose(got[k].numpy(), one.numpy(), rtol=0,
                                   atol=1e-5 * float(one.abs().max()))
        leaf = hidden.double().requires_grad_(True)
        p = torch.softmax(lm.spec.head(model, leaf), -1).gather(1, targets[:, k:k + 1])
        (ref,) = torch.autograd.grad(p.sum(), leaf)
        np.testing.assert_allclose(got[k].double().numpy(), ref.numpy(), rtol=0,
                                   atol=2e-6 * float(ref.abs().max()))


def test_shared_head_gradients_without_restricted_columns(tiny_gpt2, monkeypatch):
    # a head whose last step is not element-wise (here a log-softmax: the same softmax)
    # cannot be restricted to one column per row: the dense products per target take over
    import kneurons.attribution as attribution
    from kneurons.attribution import _head_gradients

    lm = tiny_gpt2
    spec = dataclasses.replace(lm.spec, head=lambda m, h: torch.log_softmax(
        m.lm_head(m.transformer.ln_f(h)), dim=-1))
    lm = dataclasses.replace(lm, spec=spec)
    calls = []
    real = attribution._target_logit_gradients
    monkeypatch.setattr(attribution, "_target_logit_gradients",
                        lambda *a: calls.append(real(*a)) or calls[-1])
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.as_tensor([[1, 2], [3, 3], [5, 9], [0, 1], [7, 4]])
    got = _head_gradients(lm, hidden, targets)
    assert calls == [None]
    for k in range(2):
        leaf = hidden.clone().requires_grad_(True)
        p = torch.softmax(lm.spec.head(lm.model, leaf), -1).gather(1, targets[:, k:k + 1])
        (one,) = torch.autograd.grad(p.sum(), leaf)
        np.testing.assert_allclose(got[k].numpy(), one.numpy(), rtol=0,
                                   atol=1e-6 * float(one.abs().max()))
    assert lm.model.get_output_embeddings().__dict__.get("forward") is None  # restored


def _old_probability_gap(lm, query, method="amig", layers=None, site="post"):
    """probability_gap as it was (5e5ec42): direct forwards per baseline, layer and token."""
    from kneurons.hooks import capture_ffn
    from kneurons.scoring import head_at, object_token_probs, replaced_token_probs

    layers = list(range(lm.n_layers)) if layers is None else sorted(set(layers))
    ids = torch.as_tensor([query.input_ids])
    pos = torch.as_tensor(query.target_positions)
    with torch.inference_mode():
        with capture_ffn(lm, layers, site) as acts, head_at(lm, pos[None, :]) as sliced:
            logits = lm.model(input_ids=ids).logits
        p_a = object_token_probs(logits if sliced[0] else logits[:, pos], query.target_ids)[0]
        if method == "ig":
            base = {layer: torch.zeros((1, len(pos), lm.d_ff)) for layer in layers}
        else:
            variants = ids.repeat(len(query.query_positions), 1)
            variants[torch.arange(len(query.query_positions)),
                     torch.as_tensor(query.query_positions)] = lm.replacement_id
            with capture_ffn(lm, layers, site) as acts:
                lm.model.base_model(input_ids=variants)
            base = {layer: acts[layer][:, pos].float() for layer in layers}
        gap = np.zeros(lm.n_layers)
        for layer in layers:
            total = 0.0
            for t in range(len(pos)):
                p_b = replaced_token_probs(lm, query, layer, pos[t], base[layer][:, t],
                                           site=site)[:, t]
                total += float(p_a[t]) - float(p_b.double().mean())
            gap[layer] = total / len(pos)
    return gap


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_roberta", "tiny_gpt2", "tiny_llama",
                                  "tiny_neox", "tiny_gemma3", "tiny_gemma3_wide",
                                  "fallback-gpt2", "fallback-bert"])
def test_probability_gap_equals_direct_forwards(name, method, request, monkeypatch):
    # the convergence check's rows run as attribution rows do (cached block inputs, one
    # position), batched: the gaps of direct forwards, float rounding apart
    import kneurons.attribution as attribution

    fallback = name.startswith("fallback-")
    lm = request.getfixturevalue("tiny_" + name.split("-")[1] if fallback else name)
    lm = without_head(lm) if fallback else lm
    runs = []
    real = attribution._run_rows
    monkeypatch.setattr(attribution, "_run_rows", lambda *a: runs.append(1) or real(*a))
    largest = 0.0
    for q in (argmax_query(lm, EN, "Tanzania", "Dodoma"),  # one token, a decent probability
              encode_query(lm, "[X] is located in [Y] .", "Kilimanjaro", "dar es salaam")):
        for layers in (None, [0, lm.n_layers - 1]):
            got = probability_gap(lm, q, method=method, layers=layers)
            want = _old_probability_gap(lm, q, method=method, layers=layers)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # float32 P
            largest = max(largest, float(np.abs(want).max()))
    assert largest > 1e-4 and runs  # gaps well above the tolerance


# ----------------------------------------------------------------------------- selection
def test_knowledge_neurons_threshold_and_cap():
    s = np.zeros((3, 5), dtype=np.float32)
    s[0, 1], s[2, 4], s[1, 0], s[1, 3], s[2, 2] = 1.0, 0.5, 0.21, 0.19, 0.5
    assert knowledge_neurons(s, 0.2, None) == [(0, 1, 1.0), (2, 2, 0.5), (2, 4, 0.5),
                                               (1, 0, pytest.approx(0.21))]
    assert knowledge_neurons(s, 0.2, 2) == [(0, 1, 1.0), (2, 2, 0.5)]
    assert knowledge_neurons(s, 0.6, None) == [(0, 1, 1.0)]
    assert knowledge_neurons(-np.abs(s), 0.2, None) == []  # no positive score
    with pytest.raises(ValueError):
        knowledge_neurons(s[0], 0.2, None)


@pytest.mark.parametrize("name,path", [("tiny_gpt2", "_run_causal"), ("tiny_llama", "_run_causal"),
                                       ("tiny_neox", "_run_causal"), ("tiny_gemma3_wide", "_run_causal"),
                                       ("tiny_bert", "_run_masked"),
                                       ("tiny_roberta", "_run_masked")])
def test_fast_models_take_the_one_position_paths(name, path, request, monkeypatch):
    # causal LMs run each row on its own position against cached keys/values, masked LMs the
    # patched and the last block; test_fallback_path_equals_fast_path proves their numbers,
    # this that they are the ones used
    import kneurons.attribution as attribution

    lm = request.getfixturevalue(name)
    calls = []
    real = getattr(attribution, path)
    monkeypatch.setattr(attribution, path, lambda *a, **k: calls.append(1) or real(*a, **k))
    attribute(lm, [encode_query(lm, EN, "Tanzania", "Dodoma")], method="ig", steps=2)
    assert calls


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_one_position_paths_with_eager_attention(kind):
    # the one-position paths pass their own attention masks: boolean for sdpa (the default,
    # tested above), additive for eager attention
    from conftest import build

    lm = build(kind)
    lm.model.set_attn_implementation("eager")
    assert lm.model.config._attn_implementation == "eager"
    qs = [encode_query(lm, EN, "Tanzania", "Dodoma"),
          encode_query(lm, "[X] is located in [Y] .", "Kilimanjaro", "Tanzania")]
    fast = attribute(lm, qs, method="amig", steps=3)
    slow = attribute(without_head(lm), qs, method="amig", steps=3)
    for f, s in zip(fast, slow):
        np.testing.assert_allclose(f.scores, s.scores, rtol=0, atol=1e-5 * np.abs(s.scores).max())


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma2"])
def test_fast_path_equals_fallback_for_the_other_registered_causal_models(kind):
    from conftest import build

    lm = build_gemma2() if kind == "gemma2" else build(kind)
    qs = [encode_query(lm, EN, "Tanzania", "Dodoma"),
          encode_query(lm, "[X] is located in [Y] .", "Kilimanjaro", "Tanzania")]
    fast = attribute(lm, qs, method="amig", steps=3)
    slow = attribute(without_head(lm), qs, method="amig", steps=3)
    for f, s in zip(fast, slow):
        assert np.abs(f.scores).max() > 0
        np.testing.assert_allclose(f.scores, s.scores, rtol=0, atol=1e-5 * np.abs(s.scores).max())


# ----------------------------------------------------------------------------- shards
def _candidates(lm):
    import pandas as pd

    facts = pd.DataFrame({
        "uuid": ["u1", "u2"], "lineid": [1, 2], "relation": ["P36", "P36"],
        "template": [EN, "[X] is located in [Y] ."], "sub_label": ["Tanzania", "Kilimanjaro"],
        "obj_uri": ["Q1", "Q2"], "obj_label": ["Dodoma", "Tanzania"],
        "wrong_obj_uri": ["Q3", "Q4"], "wrong_obj_label": ["Paris", "France"]})
    from kneurons.shards import candidate_table
    return candidate_table(facts, "discovery")


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
def test_shard_records_the_completeness_error(name, request, caplog):
    from kneurons.records import COMPLETENESS_TOLERANCE, completeness_error
    from kneurons.shards import _warn_incomplete, attribute_candidates, check_layers

    lm = request.getfixturevalue(name)
    cands = _candidates(lm)
    recs = attribute_candidates(lm, cands, method="amig", steps=12, quadrature="gauss-legendre",
                                keep_top=5)
    errors = recs["completeness_error"].to_numpy()
    assert len(errors) == len(cands) and np.all(errors < COMPLETENESS_TOLERANCE)
    q = encode_query(lm, EN, "Tanzania", "Dodoma")
    (res,) = attribute(lm, [q], method="amig", steps=12, quadrature="gauss-legendre")
    checked = check_layers(lm.n_layers)
    assert checked == [0, lm.n_layers // 2, lm.n_layers - 1] if lm.n_layers == 3 else checked
    assert errors[0] == pytest.approx(completeness_error(
        res.scores[checked], probability_gap(lm, q, method="amig")[checked]), rel=0.05, abs=1e-6)
    with caplog.at_level("INFO"):
        assert _warn_incomplete(recs, "amig", lm.spec.model_type, 12) == 0
    assert "WARNING" not in caplog.text


def test_shard_warns_about_the_degenerate_zero_baseline(tiny_gemma3, caplog):
    from kneurons.shards import _warn_incomplete, attribute_candidates

    recs = attribute_candidates(tiny_gemma3, _candidates(tiny_gemma3), method="ig", steps=20,
                                quadrature="riemann", keep_top=5)
    assert (recs["completeness_error"] > 0.5).all()
    with caplog.at_level("WARNING"):
        assert _warn_incomplete(recs, "ig", "gemma3_text", 20) == len(recs)
    assert "2 of 2 queries" in caplog.text and "degenerate on gemma3_text" in caplog.text


def test_completeness_error_formula():
    from kneurons.records import completeness_error
    from kneurons.shards import check_layers

    assert check_layers(30) == [0, 14, 29] and check_layers(2) == [0, 1]
    assert check_layers(1) == [0]

    scores = np.array([[0.1, 0.2], [0.0, -0.1]])
    assert completeness_error(scores, np.array([0.3, -0.2])) == pytest.approx(0.1 / 0.5)
    # tiny gaps: measured against the floor (1e-3 probability units)
    tiny = np.array([[1e-6, 0.0], [0.0, 0.0]])
    assert completeness_error(tiny, np.array([3e-6, 0.0])) == pytest.approx(2e-6 / 1e-3)
    assert completeness_error(np.zeros((2, 2)), np.zeros(2)) == 0.0



def test_object_prob_gradient_is_the_softmax_gradient_and_spares_a_leaf():
    from kneurons.attribution import object_prob

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(19, 50, generator=gen, dtype=torch.float32)).requires_grad_(True)
    tgt = torch.randint(0, 50, (19,), generator=gen)  # 19 rows: more than one chunk of 8
    weights = torch.rand(19, generator=gen)
    kept = logits.detach().clone()
    (ours,) = torch.autograd.grad((object_prob(logits, tgt) * weights).sum(), logits)
    ref_p = torch.softmax(logits, dim=-1).gather(1, tgt[:, None])[:, 0]
    (ref,) = torch.autograd.grad((ref_p * weights).sum(), logits)
    torch.testing.assert_close(object_prob(logits, tgt), ref_p.detach())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(logits.detach(), kept)  # the caller's leaf is not overwritten
