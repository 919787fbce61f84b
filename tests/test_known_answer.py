"""A known answer for DKN detection: a fact written redundantly through two FFN neurons.

A tiny GPT-2 gets two neurons a, b of its last FFN layer that are always on (a constant bias,
no input weights) and each write half of a large push along the object token's output
direction into the residual stream. Either one alone saturates P(object); together they are
all that makes the model predict the object. So suppressing a or b alone keeps P(object), and
suppressing both drops it: (a, b) is a degenerate pair by construction, and no pair of the
uninvolved neurons offered beside them is. The check runs the whole suppression path
(record rows -> knowledge neurons -> query encoding -> FFN hooks -> DKN rule -> relation
aggregation), not the rule alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import build
from kneurons.dkn import aggregate_relations, detect_dkn_records, detect_query_dkn
from kneurons.scoring import erased_token_probs
from kneurons.queries import encode_query

TEMPLATE, SUBJECT = "[X] lives in [Y] .", "Anna"
PAIR = [(2, 5), (2, 17)]                      # the planted neurons (last layer of 3)
UNINVOLVED = [(2, 0), (2, 30), (1, 3), (1, 40), (0, 7)]


def _single_token_object(lm) -> str:
    for word in ["Paris", "Rome", "London", "Berlin", "the", "a", "in", "of"]:
        if len(encode_query(lm, TEMPLATE, SUBJECT, word).target_ids) == 1:
            return word
    raise AssertionError("no single-token object in the tiny vocabulary")


@pytest.fixture(scope="module")
def planted():
    """The model with the pair written in, and the fact's object."""
    lm = build("gpt2", seed=3)
    obj = _single_token_object(lm)
    query = encode_query(lm, TEMPLATE, SUBJECT, obj)
    target = query.target_ids[0]
    gpt = lm.model.transformer
    mlp = gpt.h[2].mlp
    with torch.no_grad():
        # the residual stream at the object position without the planted neurons
        hidden = lm.model(input_ids=torch.tensor([query.input_ids]),
                          output_hidden_states=True).hidden_states[-2][0, query.target_positions[0]]
        gpt.ln_f.weight.mul_(20.0)  # a peaked output: a dominant direction saturates P
        direction = lm.model.lm_head.weight[target] / gpt.ln_f.weight
        direction = direction - direction.mean()  # ln_f removes the mean
        direction = direction / direction.norm()  # [hidden]
        push = 40.0 * float(hidden.norm()) + 40.0
        for layer, neuron in PAIR:
            mlp.c_fc.weight[:, neuron] = 0.0        # Conv1D weight [hidden, d_ff]: no input
            mlp.c_fc.bias[neuron] = 3.0             # always on: GELU(3) ~ 3
            mlp.c_proj.weight[neuron] = 0.5 * push / 3.0 * direction  # [d_ff, hidden] row
    return lm, obj


def test_the_construction_is_what_it_claims(planted):
    lm, obj = planted
    query = encode_query(lm, TEMPLATE, SUBJECT, obj)
    probs = erased_token_probs(lm, query, [[], [PAIR[0]], [PAIR[1]], PAIR])[:, 0]  # [4]
    base, only_a, only_b, both = probs
    assert base > 0.99 and only_a > 0.99 and only_b > 0.99  # either alone suffices
    assert both < 0.5 * base                                 # together they carry the fact


def test_dkn_detection_finds_the_planted_pair_and_no_other(planted):
    lm, obj = planted
    kn = UNINVOLVED[:2] + [PAIR[0]] + UNINVOLVED[2:] + [PAIR[1]]
    facts = pd.DataFrame({"uuid": ["u1"], "template": [TEMPLATE], "sub_label": [SUBJECT],
                          "calibration": [False]})
    scores = np.linspace(1.0, 0.5, len(kn)).tolist()  # all above τ = 0.2 of the best
    records = pd.DataFrame({"uuid": ["u1"], "relation": ["P19"], "candidate": ["true"],
                            "obj_label": [obj], "top_layers": [[n[0] for n in kn]],
                            "top_neurons": [[n[1] for n in kn]], "top_scores": [scores]})
    found = detect_dkn_records(lm, facts, records, kn_threshold=0.2, max_kn=20,
                               single_drop=0.2, pair_drop=0.25)
    row = found.iloc[0]
    assert row["tested_pairs"] == len(kn) * (len(kn) - 1) // 2  # every single is robust
    pairs = [tuple(zip(layers, neurons)) for layers, neurons in
             zip(row["pair_layers"], row["pair_neurons"])]
    assert pairs == [tuple(PAIR)]
    assert sorted(zip(row["dkn_layers"], row["dkn_neurons"])) == sorted(PAIR)
    summary, _, _ = aggregate_relations(found, 0.7)
    assert summary["relations"]["P19"]["dkn"] == [list(n) for n in sorted(PAIR)]


def test_uninvolved_neurons_alone_give_no_pair(planted):
    lm, obj = planted
    query = encode_query(lm, TEMPLATE, SUBJECT, obj)
    found = detect_query_dkn(lm, query, UNINVOLVED + [PAIR[0]], single_drop=0.2,
                             pair_drop=0.25)
    assert found.tested_pairs == 15 and found.pairs == []
