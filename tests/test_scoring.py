"""kneurons.scoring against direct forward passes with hand-edited weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from kneurons import scoring
from kneurons.hooks import FFNPatch, ffn_hooks, patch_ffn
from kneurons.likn import score_queries
from kneurons.queries import encode_prompt, pad_queries
from kneurons.scoring import erased_token_probs

PROMPTS = {
    "bert": [("the capital of tanzania is [MASK] .", "dodoma"),
             ("the capital of france is [MASK] .", "paris"),
             ("kili ##man is located in [MASK] .", "tanzania")],
    "gpt2": [("The capital of Tanzania is [MASK]", "Dodoma"),
             ("The capital of France is [MASK]", "Paris"),
             ("Kilimanjaro is located in [MASK]", "Tanzania")],
}
PROMPTS["llama"] = PROMPTS["gpt2"]


def queries_of(lm, kind):
    return [encode_prompt(lm, p, t) for p, t in PROMPTS[kind]]


def direct(lm, query, weight_edit=None):
    """P(object) and token probs of one query by a plain forward of a (weight-edited) copy."""
    model = copy.deepcopy(lm.model)
    if weight_edit is not None:
        weight_edit(model)
    ids = torch.as_tensor([query.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # [S, vocab]
    probs = torch.softmax(logits[query.target_positions].float(), -1)  # [T, vocab]
    p = probs[torch.arange(len(query.target_ids)), query.target_ids].numpy()
    top1 = bool((logits[query.target_positions].argmax(-1) ==
                 torch.as_tensor(query.target_ids)).all())
    return p, top1


def scale_value_slots(lm, layer, neurons, factor):
    """Multiply the weights through which ``neurons`` of ``layer`` write the residual stream
    (nn.Linear [hidden, d_ff]: columns; GPT-2 Conv1D [d_ff, hidden]: rows)."""
    def edit(model):
        blocks = {"bert": lambda m: m.bert.encoder.layer[layer].output.dense,
                  "gpt2": lambda m: m.transformer.h[layer].mlp.c_proj,
                  "llama": lambda m: m.model.layers[layer].mlp.down_proj}
        proj = blocks[lm.spec.model_type](model)
        with torch.no_grad():
            if isinstance(proj, nn.Linear):
                proj.weight[:, neurons] *= factor
            else:
                proj.weight[neurons, :] *= factor
    return edit


@pytest.fixture(params=["bert", "gpt2", "llama"])
def model(request, tiny_bert, tiny_gpt2, tiny_llama):
    return request.param, {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]


@pytest.mark.parametrize("factor", [0.0, 2.0, -1.5])
def test_last_layer_intervention_equals_edited_weights(model, factor):
    # in the last layer an activation change at the object position reaches only that
    # position's output, so it equals scaling the neurons' value slots everywhere
    kind, lm = model
    layer, neurons = lm.n_layers - 1, [1, 5, 7]
    queries = queries_of(lm, kind)
    iv = (scoring.erase([(layer, n) for n in neurons]) if factor == 0 else
          scoring.enhance([(layer, n) for n in neurons], factor))
    got = scoring.score(lm, queries, [iv] * len(queries))
    plain = scoring.score(lm, queries)
    for i, q in enumerate(queries):
        want, want_top1 = direct(lm, q, scale_value_slots(lm, layer, neurons, factor))
        np.testing.assert_allclose(got.token_probs[i], want, rtol=1e-4, atol=1e-7)
        assert got.prob[i] == pytest.approx(want.mean(), rel=1e-4, abs=1e-7)
        assert got.top1[i] == want_top1
        base, _ = direct(lm, q)
        np.testing.assert_allclose(plain.token_probs[i], base, rtol=1e-4, atol=1e-7)
        assert not np.allclose(got.token_probs[i], base)  # the intervention did something


def manual_forward(lm, query, neurons, fn):
    """A forward whose FFN activations of ``neurons`` {layer: [index]} are replaced by
    ``fn(act)`` at the object positions, by hooks written here (not kneurons.hooks)."""
    pos = query.target_positions

    def hook_of(idx):
        def pre_hook(mod, args):
            act = args[0].clone()  # [1, S, d_ff]
            for p in pos:
                act[0, p, idx] = fn(act[0, p, idx])
            return (act,)
        return pre_hook
    handles = [lm.ffn_site(layer).register_forward_pre_hook(hook_of(idx))
               for layer, idx in neurons.items()]
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.as_tensor([query.input_ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    probs = torch.softmax(logits[pos].float(), -1)  # [T, vocab]
    return probs[torch.arange(len(pos)), query.target_ids].numpy()


def test_batched_rows_with_different_interventions_equal_one_by_one(model):
    # early layers (the change spreads to later positions), mixed rows in one padded batch
    kind, lm = model
    queries = queries_of(lm, kind)
    ivs = [scoring.erase([(0, 3), (0, 4), (1, 2)]), scoring.enhance([(0, 3)], 3.0),
           scoring.Intervention(((1, 6),), "set", 1.25)]
    by_hand = [({0: [3, 4], 1: [2]}, lambda a: a * 0), ({0: [3]}, lambda a: a * 3.0),
               ({1: [6]}, lambda a: torch.full_like(a, 1.25))]
    got = scoring.score(lm, queries + queries, ivs + [scoring.NONE] * 3, batch_size=4)
    for i, q in enumerate(queries):
        want = manual_forward(lm, q, *by_hand[i])
        np.testing.assert_allclose(got.token_probs[i], want, rtol=1e-4, atol=1e-7)
        alone = scoring.score(lm, [q], [ivs[i]])
        np.testing.assert_allclose(got.token_probs[i], alone.token_probs[0], rtol=1e-4,
                                   atol=1e-7)
        base, _ = direct(lm, q)
        np.testing.assert_allclose(got.token_probs[3 + i], base, rtol=1e-4, atol=1e-7)
        assert not np.allclose(want, base)


def test_hooks_are_removed_and_weights_untouched(tiny_gpt2):
    lm = tiny_gpt2
    q = queries_of(lm, "gpt2")[0]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    scoring.score(lm, [q], [scoring.enhance([(0, 1), (2, 3)])])
    for layer in range(lm.n_layers):
        assert not lm.ffn_site(layer)._forward_pre_hooks
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_the_existing_suppression_paths_are_special_cases(tiny_bert, tiny_gpt2):
    for lm, kind in ((tiny_bert, "bert"), (tiny_gpt2, "gpt2")):
        queries = queries_of(lm, kind)
        sets = [[], [(0, 1)], [(0, 1), (1, 4), (2, 9)]]
        general = scoring.score(lm, [queries[0]] * len(sets), [scoring.erase(s) for s in sets])
        np.testing.assert_allclose(erased_token_probs(lm, queries[0], sets),
                                   np.stack(general.token_probs), rtol=1e-5, atol=1e-7)
        probs, top1 = score_queries(lm, queries, erase=sets[2])
        got = scoring.score(lm, queries, [scoring.erase(sets[2])] * len(queries))
        np.testing.assert_allclose(got.prob, probs, rtol=1e-5, atol=1e-8)
        assert (got.top1 == top1).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="op must be"):
        scoring.Intervention(((0, 1),), "double")
    assert scoring.Intervention(((0, 1), (0, 1), (1, 2))).neurons == ((0, 1), (1, 2))


def test_the_head_runs_only_at_the_object_positions_and_gives_the_same_scores(model, monkeypatch):
    kind, lm = model
    queries = queries_of(lm, kind)
    ivs = [scoring.erase([(0, 3)]), scoring.NONE, scoring.enhance([(1, 2)])]
    head = lm.model.get_output_embeddings()
    shapes = []
    handle = head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    try:
        sliced = scoring.score(lm, queries, ivs)
    finally:
        handle.remove()
    width = max(len(q.target_positions) for q in queries)
    assert shapes == [(3, width, head.out_features)]  # not [3, seq, vocab]
    assert not head._forward_pre_hooks
    monkeypatch.setattr(type(lm.model), "get_output_embeddings", lambda self: None)
    full = scoring.score(lm, queries, ivs)
    for a, b in zip(sliced.token_probs, full.token_probs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert (sliced.top1 == full.top1).all()


# ---- the paths scoring replaced, frozen as they were (024c03b), must give bitwise the same ----

def _old_target_probs(logits, q):  # hooks._target_probs
    pos = torch.as_tensor(q.target_positions, device=logits.device)
    tgt = torch.as_tensor(q.target_ids, device=logits.device)
    probs = torch.softmax(logits[:, pos, :].float(), dim=-1)
    return probs.gather(-1, tgt[None, :, None].expand(probs.shape[0], -1, 1)).squeeze(-1)


def _old_suppress_batch(lm, query, neuron_sets, *, batch_size=64):  # hooks.suppress_batch
    n = len(neuron_sets)
    out = np.zeros((n, len(query.target_ids)), dtype=np.float32)
    bs = n if batch_size is None else max(1, int(batch_size))
    ids = torch.as_tensor(query.input_ids, device=lm.device)[None, :]
    pos = torch.as_tensor(query.target_positions, dtype=torch.long, device=lm.device)
    for start in range(0, n, bs):
        chunk = neuron_sets[start:start + bs]
        pairs = {}
        for r, s in enumerate(chunk):
            for layer, neuron in s:
                rows_l, neus_l = pairs.setdefault(int(layer), ([], []))
                rows_l.append(r)
                neus_l.append(int(neuron))

        def zeroer(rows_l, neus_l):
            r_t = torch.as_tensor(rows_l, dtype=torch.long, device=lm.device)
            n_t = torch.as_tensor(neus_l, dtype=torch.long, device=lm.device)
            idx = (r_t[:, None], pos[None, :], n_t[:, None])
            return lambda act: act.index_put(idx, torch.zeros((), dtype=act.dtype,
                                                              device=act.device))

        with torch.inference_mode(), ffn_hooks(lm, {k: zeroer(*v) for k, v in pairs.items()}):
            logits = lm.model(input_ids=ids.expand(len(chunk), -1)).logits
        out[start:start + len(chunk)] = _old_target_probs(logits, query).cpu().numpy()
    return out


def _old_score_queries(lm, queries, erase=()):  # likn.score_queries
    by_layer = {}
    for layer, neuron in dict.fromkeys((int(a), int(b)) for a, b in erase):
        by_layer.setdefault(layer, []).append(neuron)
    patches = [FFNPatch(layer, neurons, positions=q.target_positions, op="zero", rows=[r])
               for r, q in enumerate(queries) for layer, neurons in by_layer.items()]
    ids, mask = pad_queries(lm, queries)
    with torch.inference_mode(), patch_ffn(lm, patches):
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
    probs, top1 = np.zeros(len(queries)), np.zeros(len(queries), dtype=bool)
    for r, q in enumerate(queries):
        pos = torch.as_tensor(q.target_positions, device=logits.device)
        tgt = torch.as_tensor(q.target_ids, device=logits.device)
        row = logits[r, pos].float()
        p = torch.softmax(row, dim=-1).gather(-1, tgt[:, None]).squeeze(-1)
        probs[r] = float(p.mean())
        top1[r] = bool((row.argmax(-1) == tgt).all())
    return probs, top1


def test_scoring_gives_the_results_of_the_paths_it_replaced(model):
    kind, lm = model
    queries = queries_of(lm, kind)
    sets = [[], [(0, 1)], [(1, 4), (0, 1)], [(0, 1), (1, 4), (1, 9), (1, 9)], [(1, 3)]]
    for batch_size in (64, 2, None):
        # erased_token_probs now runs the LM head at the object positions only (issue #16):
        # the same numbers up to the float noise of a smaller matrix product
        np.testing.assert_allclose(erased_token_probs(lm, queries[0], sets,
                                                      batch_size=batch_size),
                                   _old_suppress_batch(lm, queries[0], sets,
                                                       batch_size=batch_size),
                                   rtol=1e-5, atol=1e-9)
    for erase in ((), sets[2], sets[3]):
        old_probs, old_top1 = _old_score_queries(lm, queries, erase)
        probs, top1 = score_queries(lm, queries, erase)
        np.testing.assert_array_equal(probs, old_probs)
        np.testing.assert_array_equal(top1, old_top1)


def test_object_token_probs_is_the_convergence_checks_probability():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))  # [N, S, V]
    pos, tgt = torch.as_tensor([1, 3]), torch.as_tensor([4, 9])
    old = torch.softmax(logits[:, pos].float(), dim=-1)[:, torch.arange(2), tgt]  # probability_gap
    assert torch.equal(scoring.object_token_probs(logits[:, pos], [4, 9]), old)


def test_replaced_token_probs_is_the_convergence_checks_baseline_forward(model):
    kind, lm = model
    query = queries_of(lm, kind)[0]
    values = torch.randn(3, lm.d_ff, generator=torch.Generator().manual_seed(1))  # [B, d_ff]
    ids = torch.as_tensor([query.input_ids])
    pos = torch.as_tensor(query.target_positions)
    for layer in range(lm.n_layers):
        def put(act, p=pos[0]):  # probability_gap's hook as it was (024c03b)
            act = act.clone()
            act[:, p] = values.to(act.dtype)
            return act
        with torch.inference_mode(), ffn_hooks(lm, {layer: put}):
            logits = lm.model(input_ids=ids.expand(3, -1)).logits
        old = torch.softmax(logits[:, pos].float(), dim=-1)[:, torch.arange(len(pos)),
                                                             torch.as_tensor(query.target_ids)]
        # the head now runs at the object positions only (issue #16): float noise apart, equal
        torch.testing.assert_close(scoring.replaced_token_probs(lm, query, layer, pos[0], values),
                                   old, rtol=1e-5, atol=1e-9)


# ---- DKN suppression rows on the attribution engine (cached block inputs, object positions) ----

def _erased_by_hand(lm, query, neurons):
    """P(object token t) with ``neurons`` [(layer, index)] at 0 at the object positions, by a
    full forward with hooks written here."""
    by_layer = {}
    for layer, neuron in neurons:
        by_layer.setdefault(layer, []).append(neuron)
    if not by_layer:
        return direct(lm, query)[0]
    pos = query.target_positions
    handles = []
    for layer, idx in by_layer.items():
        def pre_hook(mod, args, idx=idx):
            act = args[0].clone()  # [1, S, d_ff]
            for p in pos:
                act[0, p, idx] = 0.0
            return (act,)
        handles.append(lm.ffn_site(layer).register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.as_tensor([query.input_ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    probs = torch.softmax(logits[pos].float(), -1)
    return probs[torch.arange(len(pos)), query.target_ids].numpy()


ERASE_MODELS = {  # fixture (or builder) -> the engine path its rows take
    "tiny_bert": "_run_masked", "tiny_roberta": "_run_masked", "tiny_gpt2": "_run_causal",
    "tiny_llama": "_run_causal", "tiny_neox": "_run_causal",
    "gemma3-sliding": "_run_fast", "gemma3-wide": "_run_causal",
    "bert-eager": "_run_masked", "gpt2-eager": "_run_causal", "llama-eager": "_run_causal"}


def _erase_model(name, request):
    from conftest import build

    if name.startswith("gemma3-"):
        return build("gemma3_text", sliding_window=4 if name.endswith("sliding") else 64)
    if name.endswith("-eager"):
        lm = build(name.split("-")[0])
        lm.model.set_attn_implementation("eager")
        return lm
    return request.getfixturevalue(name)


@pytest.mark.parametrize("name", sorted(ERASE_MODELS))
def test_erased_rows_equal_direct_forwards(name, request, monkeypatch):
    # rows enter at the block of their lowest erased layer and run on the object position(s)
    # alone where exact; later layers' neurons are erased as the row reaches their block;
    # one- and several-token objects (masks / teacher-forced positions)
    import kneurons.attribution as attribution

    lm = _erase_model(name, request)
    last = lm.n_layers - 1
    sets = [[], [(0, 3)], [(last, 5)], [(0, 1), (last, 7)], [(last, 2), (0, 2), (0, 9)],
            [(1, 4), (1, 6)], [(0, 1), (0, 1)], [(layer, 2 * layer + 1) for layer in
                                                 range(lm.n_layers)],
            [(last, n) for n in range(0, lm.d_ff, 3)], [(1, 8)]]
    path = ERASE_MODELS[name]
    calls = []
    real = getattr(attribution, path)
    monkeypatch.setattr(attribution, path, lambda *a, **k: calls.append(1) or real(*a, **k))
    for query in (encode_prompt(lm, *PROMPTS["gpt2" if lm.arch == "causal" else "bert"][0]),
                  encode_prompt(lm, "The capital of Tanzania is [MASK] .", "dar es salaam")):
        want = np.stack([_erased_by_hand(lm, query, s) for s in sets])
        assert not np.allclose(want[0], want[-2], rtol=1e-3)  # erasing has an effect
        for batch_size in (None, 3, 1):
            got = erased_token_probs(lm, query, sets, batch_size=batch_size)
            assert got.shape == (len(sets), len(query.target_ids)) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert len(query.target_ids) > 1 and calls  # several object tokens; the engine's path


def test_erased_rows_of_several_queries_equal_one_query_at_a_time(tiny_bert, tiny_gpt2):
    from kneurons.scoring import _erased_full_forwards, erased_token_probs_many

    for lm, kind in ((tiny_bert, "bert"), (tiny_gpt2, "gpt2")):
        queries = queries_of(lm, kind) + [
            encode_prompt(lm, "The capital of Tanzania is [MASK] .", "dar es salaam")]
        assert len({len(q.target_ids) for q in queries}) > 1  # object lengths differ
        sets = [[[], [(0, 1)], [(0, 1), (2, 3)]], [], [[(2, 4)], [(1, 1), (0, 2)]],
                [[(1, 5)], [], [(0, 5), (1, 5), (2, 5)]]]
        many = erased_token_probs_many(lm, queries, sets, batch_size=2)
        assert [m.shape for m in many] == [(len(s), len(q.target_ids))
                                           for q, s in zip(queries, sets)]
        for q, s, m in zip(queries, sets, many):
            np.testing.assert_allclose(m, erased_token_probs(lm, q, s), rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(m, _erased_full_forwards(lm, q, s, 64), rtol=1e-4,
                                       atol=1e-7)


def test_an_erasure_captures_its_queries_once(tiny_gpt2, monkeypatch):
    # DKN detection asks twice (singles, then pairs): one capture pass per padding group
    import kneurons.attribution as attribution

    lm = tiny_gpt2
    queries = queries_of(lm, "gpt2")
    assert len({len(q.target_ids) for q in queries}) == 3  # object lengths differ: 3 groups
    captured = []
    real = attribution._capture
    monkeypatch.setattr(attribution, "_capture",
                        lambda lm_, qs, *a, **k: captured.append(len(qs)) or real(lm_, qs, *a, **k))
    rows = scoring.Erasure(lm, queries, lowest_layer=1, batch_size=2)
    first = rows.token_probs([[[], [(1, 3)]], [[(2, 5), (1, 1)]], []])
    second = rows.token_probs([[[(2, 2)]], [], [[(1, 4)], [(2, 4), (2, 5)]]])
    assert captured == [1, 1, 1]  # once each, not once per call
    monkeypatch.setattr(attribution, "_capture", real)
    for got, q, s in zip(first + second, queries * 2,
                         [[[], [(1, 3)]], [[(2, 5), (1, 1)]], [], [[(2, 2)]], [],
                          [[(1, 4)], [(2, 4), (2, 5)]]]):
        np.testing.assert_allclose(got, erased_token_probs(lm, q, s), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="below the lowest captured layer"):
        rows.token_probs([[[(0, 1)]], [], []])


def test_an_erasure_without_a_registered_head_runs_full_forwards(tiny_bert):
    import dataclasses

    lm = tiny_bert
    plain = dataclasses.replace(lm, spec=dataclasses.replace(lm.spec, head=None))
    queries = queries_of(lm, "bert")
    sets = [[[], [(0, 1), (2, 3)]], [[(1, 2)]], []]
    got = scoring.Erasure(plain, queries).token_probs(sets)
    assert scoring.Erasure(plain, queries).rows is None
    for g, w in zip(got, scoring.Erasure(lm, queries).token_probs(sets)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8)
