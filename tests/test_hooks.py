"""Scoped hooks: reading, editing, batched suppression; handles are always removed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kneurons.hooks import FFNPatch, capture_block_inputs, capture_ffn, ffn_hooks, patch_ffn
from kneurons.scoring import erased_token_probs
from kneurons.queries import encode_query

EN = "The capital of [X] is [Y] ."


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def raw_ffn_module(lm, layer):
    """The FFN output projection, reached without the registry."""
    if lm.spec.model_type == "bert":
        return lm.model.bert.encoder.layer[layer].output.dense
    if lm.spec.model_type == "gpt2":
        return lm.model.transformer.h[layer].mlp.c_proj
    raise NotImplementedError


def direct_probs(lm, q, patch: dict[int, list[int]]) -> np.ndarray:
    """P(target tokens) with neurons zeroed at the target positions, via a raw pre-hook."""
    handles = []
    for layer, neurons in patch.items():
        def hook(mod, args, neurons=neurons):
            act = args[0].clone()
            for p in q.target_positions:
                act[0, p, neurons] = 0.0
            return (act,)
        handles.append(raw_ffn_module(lm, layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([q.input_ids])).logits[0]
    finally:
        for h in handles:
            h.remove()
    probs = torch.softmax(logits[q.target_positions], -1)
    return probs[range(len(q.target_ids)), q.target_ids].numpy()


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2"])
def test_capture_sites_are_pre_and_post_activation(name, request):
    lm = request.getfixturevalue(name)
    ids = torch.tensor([lm.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad(), capture_ffn(lm, [0, 2], site="post") as post, \
            capture_ffn(lm, [0, 2], site="pre") as pre:
        lm.model(input_ids=ids)
    assert set(post) == {0, 2} and post[0].shape == (1, ids.shape[1], lm.d_ff)
    act = (lm.model.bert.encoder.layer[0].intermediate.intermediate_act_fn
           if lm.spec.model_type == "bert" else lm.model.transformer.h[0].mlp.act)
    for layer in (0, 2):
        assert torch.allclose(post[layer], act(pre[layer]), atol=1e-6)
    assert n_hooks(lm.model) == 0


def test_pre_site_undefined_for_gated_ffn(tiny_llama):
    with pytest.raises(ValueError, match="gated"):
        with capture_ffn(tiny_llama, [0], site="pre"):
            pass
    assert n_hooks(tiny_llama.model) == 0


@pytest.mark.parametrize("ctx", ["capture", "edit", "hooks", "blocks"])
def test_hooks_removed_after_error(ctx, tiny_bert):
    lm = tiny_bert
    managers = {
        "capture": lambda: capture_ffn(lm, [0, 1, 2]),
        "edit": lambda: patch_ffn(lm, [FFNPatch(1, [0, 1], op="zero")]),
        "hooks": lambda: ffn_hooks(lm, {0: lambda a: a, 2: lambda a: a}, site="pre"),
        "blocks": lambda: capture_block_inputs(lm, [0, 1, 2]),
    }
    with pytest.raises(RuntimeError, match="boom"):
        with managers[ctx]():
            assert n_hooks(lm.model) >= 1
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([[2, 5, 6, 3]]))
            raise RuntimeError("boom")
    assert n_hooks(lm.model) == 0


def test_hooks_removed_after_error_during_registration(tiny_bert):
    with pytest.raises(IndexError):
        with capture_ffn(tiny_bert, [0, 1, 99]):
            pass
    assert n_hooks(tiny_bert.model) == 0


def test_edit_ops_against_raw_hook(tiny_bert):
    lm = tiny_bert
    q = encode_query(lm, EN, "Tanzania", "Dodoma")
    ids = torch.tensor([q.input_ids] * 2)
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        with patch_ffn(lm, [FFNPatch(1, [3, 7], positions=q.target_positions, op="zero")]):
            zeroed = lm.model(input_ids=ids).logits
        with patch_ffn(lm, [FFNPatch(1, [3, 7], positions=q.target_positions, op="scale",
                                   value=0.0)]):
            scaled0 = lm.model(input_ids=ids).logits
        with patch_ffn(lm, [FFNPatch(1, [3, 7], op="scale", value=1.0)]):
            scaled1 = lm.model(input_ids=ids).logits
        with patch_ffn(lm, [FFNPatch(0, [5], positions=[2], op="set", value=2.5, rows=[1])]):
            row1 = lm.model(input_ids=ids).logits
        with capture_ffn(lm, [0]) as seen, \
                patch_ffn(lm, [FFNPatch(0, [5], positions=[2], op="set", value=2.5)]):
            lm.model(input_ids=ids[:1])

    def manual(mod, args):
        act = args[0].clone()
        act[:, q.target_positions[0], [3, 7]] = 0.0
        return (act,)
    h = raw_ffn_module(lm, 1).register_forward_pre_hook(manual)
    try:
        with torch.no_grad():
            expected = lm.model(input_ids=ids).logits
    finally:
        h.remove()
    assert torch.allclose(zeroed, expected, atol=1e-6)
    assert not torch.allclose(zeroed, base, atol=1e-4)
    assert torch.allclose(scaled0, zeroed, atol=1e-6)
    assert torch.allclose(scaled1, base, atol=1e-6)
    assert torch.allclose(row1[0], base[0], atol=1e-6)  # only batch row 1 edited
    assert not torch.allclose(row1[1], base[1], atol=1e-4)
    assert seen[0][0, 2, 5].item() != 2.5  # capture (registered first) saw the original
    assert n_hooks(lm.model) == 0


@pytest.mark.parametrize("name,template,subject,target", [
    ("tiny_bert", "[X] is located in [Y] .", "Tanzania", "Kilimanjaro"),
    ("tiny_bert", EN, "Tanzania", "Dodoma"),
    ("tiny_gpt2", EN, "Tanzania", "Dodoma"),
])
def test_suppress_batch_matches_direct_forwards(name, template, subject, target, request):
    lm = request.getfixturevalue(name)
    q = encode_query(lm, template, subject, target)
    sets = [[], [(0, 3)], [(1, 5), (2, 7)], [(2, 7), (2, 8)], [(0, 1), (0, 1)],
            [(2, n) for n in range(0, lm.d_ff, 3)]]
    got = erased_token_probs(lm, q, sets)
    assert got.shape == (len(sets), len(q.target_ids)) and got.dtype == np.float32
    for row, s in zip(got, sets):
        patch: dict[int, list[int]] = {}
        for layer, neuron in s:
            patch.setdefault(layer, []).append(neuron)
        np.testing.assert_allclose(row, direct_probs(lm, q, patch), rtol=1e-4, atol=1e-7)
    assert not np.allclose(got[0], got[-1], rtol=1e-3)  # suppression has an effect
    np.testing.assert_allclose(erased_token_probs(lm, q, sets, batch_size=4), got, rtol=1e-5,
                               atol=1e-8)
    assert n_hooks(lm.model) == 0


@pytest.mark.parametrize("name", ["tiny_roberta", "tiny_llama", "tiny_neox"])
def test_capture_other_architectures(name, request):
    """The registry's site is the post-nonlinearity activation (gate product for llama)."""
    lm = request.getfixturevalue(name)
    layer = lm.n_layers - 1
    t = lm.spec.model_type
    if t == "roberta":
        blk = lm.model.roberta.encoder.layer[layer]
        mlp_in, fn = blk.intermediate, lambda x: blk.intermediate(x)
    elif t == "llama":
        mlp = lm.model.model.layers[layer].mlp
        mlp_in, fn = mlp, lambda x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    else:
        mlp = lm.model.gpt_neox.layers[layer].mlp
        mlp_in, fn = mlp, lambda x: mlp.act(mlp.dense_h_to_4h(x))
    seen = {}
    h = mlp_in.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        with torch.no_grad(), capture_ffn(lm, [layer]) as acts:
            lm.model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]))
    finally:
        h.remove()
    assert acts[layer].shape == (1, 5, lm.d_ff)
    with torch.no_grad():
        assert torch.allclose(acts[layer], fn(seen["x"]), atol=1e-6)
    assert n_hooks(lm.model) == 0
