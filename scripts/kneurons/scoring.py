"""Score a fact's object under an intervention on FFN neurons: the one scoring path.

"Set some neurons' activations at the object positions (to 0 = erase, x k = enhance, or any
value) and score the object": the measure behind knowledge-neuron suppression (Dai et al.
2022), DKN detection, the LIKN erasing experiment and the localization evaluation.

* **Where.** An :class:`Intervention` changes the activation (the input of the FFN output
  projection, :mod:`kneurons.hooks` site ``"post"``) of its neurons at the object position(s)
  *of the query it is applied to* (``EncodedQuery.target_positions``: the masks of a masked LM,
  one per object token; the positions just before each object token of a causal LM, whose
  input is teacher-forced), in that query's batch row only. Other positions are untouched.
* **What is scored.** P(object) = the mean over the object's tokens of P(token t) at its
  position (teacher-forced for causal LMs, one [MASK] per object token for masked LMs, as
  everywhere in kneurons); top-1 = every object token is the argmax at its position.
* **Batched.** Rows (query, intervention) of different queries and interventions share a
  forward: right-padded with an attention mask (:func:`kneurons.queries.pad_queries`), so a
  row's score does not depend on its companions up to float noise; ``batch_size`` caps the
  rows per forward (the model computes full logits [rows, seq, vocab]).

The interventions are activation patches, :class:`kneurons.hooks.FFNPatch` through
:func:`kneurons.hooks.patch_ffn` (scoped hooks, removed in ``finally``); the model's weights
are never touched. P(object token) is computed in one place, :func:`object_token_probs`.

:func:`score` is the general call (one intervention per row), used by the localization
evaluation and (``head="full"``) by the LIKN erasing experiment; :func:`erased_token_probs`
(one query, many erased sets, per-token probabilities) and :func:`erased_token_probs_many`
(several queries; :class:`Erasure` for repeated calls on the same queries) are DKN
detection's suppression, run on the attribution engine's rows
(:class:`kneurons.attribution.ErasedRows`: from the cached input of the lowest erased
layer's block, on the object positions alone where exact), the same numbers as full forwards
up to float rounding; :func:`replaced_token_probs` (whole activation vectors set to baseline
values) was the attribution's convergence check, whose rows now run on the engine too
(:func:`kneurons.attribution.probability_gap`). :func:`score` keeps the exact operations of the
paths it replaced (``likn.score_queries``), so results are bitwise the same
(tests/test_scoring.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from .hooks import FFNPatch, ffn_hooks, patch_ffn
from .models import LanguageModel
from .neurons import Neuron
from .queries import EncodedQuery, pad_queries

OPS = ("zero", "scale", "set")


@dataclass(frozen=True)
class Intervention:
    """New activations of ``neurons`` at the object positions: ``op="zero"`` (erase: 0),
    ``"scale"`` (multiply by ``value``, e.g. 2 = enhance), ``"set"`` (set to ``value``).
    Duplicate neurons count once; no neurons = the unpatched model."""

    neurons: tuple[Neuron, ...] = ()
    op: Literal["zero", "scale", "set"] = "zero"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        unique = tuple(dict.fromkeys((int(a), int(b)) for a, b in self.neurons))
        object.__setattr__(self, "neurons", unique)


def erase(neurons: Iterable[Neuron]) -> Intervention:
    """Activation 0 at the object positions (Dai et al.'s suppression)."""
    return Intervention(tuple(neurons), "zero", 0.0)


def enhance(neurons: Iterable[Neuron], factor: float = 2.0) -> Intervention:
    """Activation x ``factor`` at the object positions (Dai et al. double it)."""
    return Intervention(tuple(neurons), "scale", float(factor))


NONE = Intervention()
"""The unpatched model."""


@dataclass
class Scores:
    """Per row: ``prob`` [n] (mean over object tokens), ``top1`` [n] bool, and
    ``token_probs`` (per row an array [n_object_tokens])."""

    prob: np.ndarray
    top1: np.ndarray
    token_probs: list[np.ndarray] = field(default_factory=list)


def object_token_probs(logits: torch.Tensor, target_ids: Sequence[int]) -> torch.Tensor:
    """P(object token t) from the logits at the object positions: [..., T, vocab] -> [..., T]
    (float32 softmax over the vocabulary)."""
    tgt = torch.as_tensor(target_ids, device=logits.device)  # [T]
    probs = torch.softmax(logits.float(), dim=-1)  # [..., T, vocab]
    return probs.gather(-1, tgt.expand(*probs.shape[:-1])[..., None]).squeeze(-1)


def _row_patches(row: int, query: EncodedQuery, intervention: Intervention) -> list[FFNPatch]:
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in intervention.neurons:
        by_layer.setdefault(layer, []).append(neuron)
    return [FFNPatch(layer, neurons, positions=query.target_positions, op=intervention.op,
                     value=intervention.value, rows=[row])
            for layer, neurons in sorted(by_layer.items())]


@contextlib.contextmanager
def head_at(lm: LanguageModel, at: torch.Tensor) -> Iterator[list[bool]]:
    """Run the LM head (the output embeddings) only at positions ``at`` [rows, T] of each
    row: its input [rows, S, hidden] is gathered to [rows, T, hidden] by a scoped pre-hook, so
    the logits come out [rows, T, vocab] (the head is most of a forward for large
    vocabularies). Yields [True] when the hook ran, [False] when the model has no output
    embeddings module (then the logits are [rows, S, vocab])."""
    head = lm.model.get_output_embeddings()
    ran = [False]
    if head is None:
        yield ran
        return
    rows = torch.arange(at.shape[0], device=at.device)[:, None]  # [rows, 1]

    def pre_hook(mod, args):
        hidden = args[0]  # [rows, S, hidden]
        if hidden.dim() != 3 or hidden.shape[0] != at.shape[0]:
            return None  # not the call we expect: leave it alone
        ran[0] = True
        return (hidden[rows, at], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield ran
    finally:
        handle.remove()


def score(lm: LanguageModel, queries: Sequence[EncodedQuery],
          interventions: Sequence[Intervention] | None = None, *,
          batch_size: int | None = 64, head: Literal["objects", "full"] = "objects") -> Scores:
    """Score row i = ``queries[i]`` under ``interventions[i]`` (default: none).

    ``head="objects"`` runs the LM head at the object positions only (:func:`head_at`);
    ``"full"`` at every position (the LIKN experiment's numbers were made so)."""
    n = len(queries)
    if interventions is None:
        interventions = [NONE] * n
    if len(interventions) != n:
        raise ValueError(f"{n} queries but {len(interventions)} interventions")
    prob, top1 = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=bool)
    token_probs: list[np.ndarray] = []
    bs = max(n, 1) if batch_size is None else max(1, int(batch_size))
    for start in range(0, n, bs):
        chunk = list(queries[start:start + bs])
        patches = [e for r, (q, iv) in enumerate(zip(chunk, interventions[start:start + bs]))
                   for e in _row_patches(r, q, iv)]
        ids, mask = pad_queries(lm, chunk)  # [rows, S] each
        width = max(len(q.target_positions) for q in chunk)
        at = torch.zeros((len(chunk), width), dtype=torch.long, device=lm.device)  # [rows, T]
        for r, q in enumerate(chunk):
            at[r, : len(q.target_positions)] = torch.as_tensor(q.target_positions)
        heads = head_at(lm, at) if head == "objects" else contextlib.nullcontext([False])
        with torch.inference_mode(), patch_ffn(lm, patches), heads as sliced:
            logits = lm.model(input_ids=ids, attention_mask=mask).logits  # [rows, S or T, V]
        for r, q in enumerate(chunk):
            pos = (torch.arange(len(q.target_positions), device=logits.device) if sliced[0]
                   else torch.as_tensor(q.target_positions, device=logits.device))
            tgt = torch.as_tensor(q.target_ids, device=logits.device)
            row = logits[r, pos].float()  # [n_targets, vocab]
            p = object_token_probs(row, q.target_ids)  # [n_targets]
            token_probs.append(p.cpu().numpy().astype(np.float64))
            prob[start + r] = float(p.mean())
            top1[start + r] = bool((row.argmax(-1) == tgt).all())
    return Scores(prob, top1, token_probs)


def erased_token_probs(lm: LanguageModel, query: EncodedQuery,
                       neuron_sets: Sequence[Iterable[Neuron]], *,
                       batch_size: int | None = 64) -> np.ndarray:
    """P(object token t) [len(neuron_sets), n_object_tokens] of one query with each set
    erased at the object positions, one row per set (an empty set: unpatched).
    ``batch_size`` caps the rows per pass (``None``: all sets in one). See
    :func:`erased_token_probs_many`."""
    return erased_token_probs_many(lm, [query], [neuron_sets], batch_size=batch_size)[0]


def erased_token_probs_many(lm: LanguageModel, queries: Sequence[EncodedQuery],
                            neuron_sets: Sequence[Sequence[Iterable[Neuron]]], *,
                            batch_size: int | None = 64) -> list[np.ndarray]:
    """:func:`erased_token_probs` of several queries (``neuron_sets[i]``: the sets of
    ``queries[i]``), their rows batched together (see :class:`Erasure`)."""
    sets = [[list(s) for s in per] for per in neuron_sets]
    lowest = min((int(layer) for per in sets for s in per for layer, _ in s),
                 default=lm.n_layers - 1)
    return Erasure(lm, queries, lowest_layer=lowest, batch_size=batch_size).token_probs(sets)


class Erasure:
    """Erasing rows of fixed queries, asked for as often as needed (DKN detection asks
    twice: singles, then pairs): P(object token t) with sets of neurons erased (activation
    0) at the object positions.

    Models with a registered head take the attribution engine's rows
    (:class:`kneurons.attribution.ErasedRows`): one unpatched pass per group of queries, here,
    with the inputs of every block from ``lowest_layer`` (the lowest layer any set will
    erase) on; then each row from the cached input of the block of its lowest erased layer,
    on the object positions alone where that is exact. Others run the full model per row
    (the query not padded, the head at the object positions only). The numbers are the same
    up to float rounding (tests/test_scoring.py compares them with direct forwards).
    ``batch_size`` caps the rows per pass (``None``: all of a group's)."""

    def __init__(self, lm: LanguageModel, queries: Sequence[EncodedQuery], *,
                 lowest_layer: int = 0, batch_size: int | None = 64) -> None:
        from .attribution import ErasedRows  # the engine (which imports this module)

        self.lm, self.queries, self.batch_size = lm, list(queries), batch_size
        self.rows = (ErasedRows(lm, self.queries, lowest_layer)
                     if lm.spec.head is not None and self.queries else None)

    def token_probs(self, neuron_sets: Sequence[Sequence[Iterable[Neuron]]]
                    ) -> list[np.ndarray]:
        """Per query i: [len(neuron_sets[i]), n_object_tokens] (an empty set: unpatched)."""
        sets = [[list(s) for s in per] for per in neuron_sets]
        if len(sets) != len(self.queries):
            raise ValueError(f"{len(self.queries)} queries but {len(sets)} lists of neuron "
                             "sets")
        if self.rows is None:
            return [_erased_full_forwards(self.lm, q, s, self.batch_size)
                    for q, s in zip(self.queries, sets)]
        return self.rows.probs(sets, batch_size=self.batch_size)


def _erased_full_forwards(lm: LanguageModel, query: EncodedQuery,
                          neuron_sets: Sequence[Iterable[Neuron]],
                          batch_size: int | None) -> np.ndarray:
    """:func:`erased_token_probs` by full forwards of the whole model, one batch row per
    set (models without a registered head)."""
    sets = [erase(s) for s in neuron_sets]
    n = len(sets)
    out = np.zeros((n, len(query.target_ids)), dtype=np.float32)
    if n == 0:
        return out
    bs = n if batch_size is None else max(1, int(batch_size))
    ids = torch.as_tensor(query.input_ids, device=lm.device)[None, :]  # [1, seq]
    pos = torch.as_tensor(query.target_positions, device=lm.device)  # [T]
    for start in range(0, n, bs):
        chunk = sets[start:start + bs]
        patches = [e for r, iv in enumerate(chunk) for e in _row_patches(r, query, iv)]
        at = pos.expand(len(chunk), -1)  # [rows, T]
        with torch.inference_mode(), patch_ffn(lm, patches), head_at(lm, at) as sliced:
            logits = lm.model(input_ids=ids.expand(len(chunk), -1)).logits  # [rows, T or S, V]
        out[start:start + len(chunk)] = object_token_probs(
            logits if sliced[0] else logits[:, pos, :], query.target_ids).cpu().numpy()
    return out


def replaced_token_probs(lm: LanguageModel, query: EncodedQuery, layer: int, position,
                         values: torch.Tensor, *, site: str = "post") -> torch.Tensor:
    """P(object token t) [B, n_object_tokens] of one query with the whole activation vector
    of ``layer`` at ``position`` replaced by ``values[i]`` ([B, d_ff]) in batch row i, by a
    full forward (what :func:`kneurons.attribution.probability_gap` measured before its rows
    ran on the engine; its tests compare with this). The query is not padded and the head
    runs at the object positions only."""
    ids = torch.as_tensor([query.input_ids], device=lm.device)  # [1, S]
    pos = torch.as_tensor(query.target_positions, device=lm.device)  # [T]

    def put(act: torch.Tensor) -> torch.Tensor:  # act: [B, S, d_ff]
        act = act.clone()
        act[:, position] = values.to(act.dtype)
        return act

    at = pos.expand(values.shape[0], -1)  # [B, T]
    with torch.inference_mode(), ffn_hooks(lm, {layer: put}, site), head_at(lm, at) as sliced:
        logits = lm.model(input_ids=ids.expand(values.shape[0], -1)).logits  # [B, T or S, V]
    return object_token_probs(logits if sliced[0] else logits[:, pos], query.target_ids)
