"""Neuron attribution: integrated gradients (IG, Dai et al. 2022) and AMIG (Chen et al. 2024).

Engine design (all steps of a layer, several layers and several queries in one pass):

1. One unpatched forward per group of queries (right-padded, with attention mask) records the
   FFN activation ``a`` at every attributed layer, the probabilities of the object, and, via
   forward pre-hooks, the exact inputs (hidden states + mask/rotary kwargs) of every block.
2. AMIG only: one batched forward over all "query token i replaced" variants records the
   baseline activations ``a'_i`` of all layers at once (``torch.inference_mode``).
3. Every (query, object token, layer, baseline, quadrature node) is one *row*. Rows are sorted
   by layer and cut into batches of ``batch_size``. A batch starts at the lowest patched
   layer ``l0`` and walks blocks ``l0..L-1``: rows of layer ``j`` join the batch at block
   ``j`` from its cached input, and block ``j``'s FFN activation is replaced at the object
   position by the row's interpolation point (a leaf tensor). Blocks below a row's layer
   are never recomputed. The LM head runs only at the object positions; one backward gives
   every row's gradient. Architectures without a registered ``head`` use a slower fallback:
   the full model on the repeated inputs, with one hook per patched layer.
4. One-position blocks (exact, for sdpa and eager attention): a causal LM runs every block of
   a row on the object position alone, attending to the cached keys/values of the earlier
   positions (a patch at position p changes no earlier position); a masked LM runs the
   patched block (only position p changes in it) and the last block (only position p is
   read) on the object position alone. Keys/values reach the model's own attention through a
   stand-in for its KV cache (``_PrefixCache``), the visible positions through the mask.

Rows of different queries share a batch only within a padding group; attention masks keep a
query's scores independent of its batch companions (up to float noise).

Relation to the authors' code (GitHub heng840/AMIG, ``knowledge_neurons/garns.py``). We
implement the paper's formula (mean over token baselines of the IG with that baseline), which
satisfies completeness. The code differs in ways we do not copy: it averages the
*interpolation points* over baselines (one path from the mean baseline), multiplies the
integrated gradient by ``a`` instead of ``a - a'``, replaces *every* input position (also
[CLS]/[SEP] and the mask itself, whose replacement changes nothing), uses the left Riemann
rule, hooks GPT's ``mlp.c_fc`` output (pre-activation; use ``site="pre"`` to match), sums
rather than averages over the object's tokens in ``garns.py`` (its IG baseline code
averages), and decodes multi-token objects greedily instead of teacher forcing.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.profiler import record_function

from .hooks import SITES, capture_block_inputs, capture_ffn, ffn_hooks, site_module
from .models import LanguageModel
from .queries import EncodedQuery, pad_queries
from .scoring import head_at, object_token_probs, replaced_token_probs

METHODS = ("ig", "amig")
QUADRATURES = ("riemann", "gauss-legendre", "linspace")
_GROUP = 16  # queries padded together in one capture forward


@dataclass
class Attribution:
    """Attribution of one query.

    ``scores``: [n_layers, d_ff] float32, mean over the object's tokens (layers not
    attributed stay 0). ``token_probs``: [n_target_tokens] P(object token t | query) at its
    position in the unpatched model (teacher forcing for causal LMs). ``prob``: the mean of
    ``token_probs`` (a per-token probability, averaged; not the joint probability).
    ``rank``: 1-based rank of the first object token at its position. ``predicted``: the
    model's own prediction is the object: argmax at every object position (for causal LMs
    this equals greedy decoding reproducing the object).
    """

    scores: np.ndarray
    token_probs: np.ndarray
    prob: float
    rank: int
    predicted: bool


def quadrature_rule(steps: int, kind: str = "riemann") -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alpha_k`` in (0, 1) and weights ``w_k`` (sum 1) for the path integral.

    ``riemann``: midpoint rule, ``alpha_k = (k - 1/2)/m``, ``w_k = 1/m`` (captum's
    ``riemann_middle``; error O(1/m^2) instead of O(1/m) for left/right points).
    ``gauss-legendre``: Gauss-Legendre nodes/weights mapped from [-1, 1] to [0, 1].
    ``linspace``: ``alpha_k = k/(m - 1)`` for k = 0..m-1 (both end points), ``w_k = 1/m``: the
    rule of Dai et al.'s code and of the ``knowledge-neurons`` library, offered so that scores
    can be compared with theirs number for number (its error is O(1/m)).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if kind == "riemann":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    if kind == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (x + 1.0), 0.5 * w
    if kind == "linspace":
        return np.linspace(0.0, 1.0, steps), np.full(steps, 1.0 / steps)
    raise ValueError(f"quadrature must be one of {QUADRATURES}, got {kind!r}")


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (only the activation leaf needs them); restores the flags."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _index_batch(obj, rows: torch.Tensor, n_cap: int):
    """Select batch rows from captured block arguments: tensors with ndim >= 2 whose first
    dim is the capture batch size (masks [G,1,S,S], rotary cos/sin [G,S,d]) are indexed;
    broadcastable ones (batch dim 1 when G > 1, 1-d cache positions) are left alone. KV
    caches are dropped."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim >= 2 and obj.shape[0] == n_cap:
            return obj.index_select(0, rows)
        return obj
    if isinstance(obj, tuple):
        return tuple(_index_batch(o, rows, n_cap) for o in obj)
    if isinstance(obj, list):
        return [_index_batch(o, rows, n_cap) for o in obj]
    if type(obj).__name__.endswith("Cache"):
        return None
    return obj


@dataclass
class _Group:
    """Everything cached for one padding group of queries (G queries, U units)."""

    qids: list[int]               # global query index per group row
    ids: torch.Tensor             # [G, S] input ids
    mask: torch.Tensor            # [G, S] attention mask
    unit_q: np.ndarray            # [U] group row of each unit (= one object token)
    unit_pos: np.ndarray          # [U] position of the unit's object token
    unit_tgt: np.ndarray          # [U] token id of the unit
    unit_nt: np.ndarray           # [U] object length of the unit's query
    acts: torch.Tensor            # [U, nL, d_ff] activation a at the unit position
    blocks: dict                  # layer -> (args, kwargs) of the block call, batch G
    logits: torch.Tensor          # [U, V] unpatched logits at the unit positions
    kv: dict | None = None        # one-position paths: layer -> unpatched (keys, values)
                                  # [G, H, S, d] of the block's attention
    cache_arg: str | None = None  # name of the block's cache argument
    attn_impl: str = "eager"      # the model's attention implementation


def _capture(lm: LanguageModel, queries: Sequence[EncodedQuery], qids: list[int],
             layers: list[int], site: str) -> _Group:
    ids, mask = pad_queries(lm, queries)
    unit_q, unit_pos, unit_tgt, unit_nt, unit_t = [], [], [], [], []
    for g, q in enumerate(queries):
        for t, (p, y) in enumerate(zip(q.target_positions, q.target_ids)):
            unit_t.append(t)  # the unit's index among its query's object tokens
            unit_q.append(g)
            unit_pos.append(p)
            unit_tgt.append(y)
            unit_nt.append(len(q.target_ids))
    uq = torch.as_tensor(unit_q, device=lm.device)
    up = torch.as_tensor(unit_pos, device=lm.device)
    fast = lm.spec.head is not None
    causal = fast and lm.arch == "causal"
    block_layers = range(min(layers), lm.n_layers) if fast else []
    # the LM head only at the object positions: at [G, T], unit u is at[unit_q[u], unit_t[u]]
    at = torch.zeros((len(queries), max(unit_t) + 1), dtype=torch.long, device=lm.device)
    at[uq, torch.as_tensor(unit_t, device=lm.device)] = up
    # no_grad, not inference_mode: the cached block inputs feed the gradient passes
    with torch.no_grad(), capture_block_inputs(lm, block_layers) as calls, \
            capture_ffn(lm, layers, site) as acts, head_at(lm, at) as sliced:
        out = lm.model(input_ids=ids, attention_mask=mask, use_cache=causal)
    a = torch.stack([acts[layer][uq, up].float() for layer in layers], dim=1)  # [U, nL, d_ff]
    logits = (out.logits[uq, torch.as_tensor(unit_t, device=lm.device)] if sliced[0]
              else out.logits[uq, up]).float()  # [U, V]
    grp = _Group(qids, ids, mask, np.array(unit_q), np.array(unit_pos), np.array(unit_tgt),
                 np.array(unit_nt), a, dict(calls), logits)
    grp.attn_impl = getattr(lm.model.config, "_attn_implementation", None) or "eager"
    if grp.attn_impl not in ("sdpa", "eager"):
        return grp  # masks of other kernels (flash attention...) cannot be passed in
    if causal:
        args, kwargs = grp.blocks[block_layers[0]]
        call = _as_kwargs(lm.blocks()[block_layers[0]], args, kwargs)
        grp.cache_arg = next((k for k, v in call.items()
                              if type(v).__name__.endswith("Cache")), None)
        cache = out.past_key_values
        # a sliding-window layer's cache may hold fewer positions than the input: such
        # groups take the full-block path (its captured masks know the window)
        if grp.cache_arg is not None and hasattr(cache, "layers") and all(
                cache.layers[j].keys.shape[2] == ids.shape[1] for j in block_layers):
            grp.kv = {j: (cache.layers[j].keys, cache.layers[j].values) for j in block_layers}
    elif fast and lm.spec.kv is not None:
        grp.cache_arg = lm.spec.cache_arg
        with torch.no_grad():
            grp.kv = {j: lm.spec.kv(lm.blocks()[j], grp.blocks[j][0][0]) for j in layers}
    return grp


def _amig_baselines(lm: LanguageModel, queries: Sequence[EncodedQuery], grp: _Group,
                    layers: list[int], site: str, batch_size: int
                    ) -> tuple[torch.Tensor, list[list[int]]]:
    """Baseline activations a'_i: the activation at each unit's position when query token i
    is replaced by the mask (masked LM) / end-of-text (causal LM) token.

    Returns baselines [n_baselines, nL, d_ff] and, per unit, the indices of its baselines.
    """
    repl = lm.replacement_id
    var_q, var_i = [], []
    for g, q in enumerate(queries):
        if not q.query_positions:
            raise ValueError(
                f"query {grp.qids[g]} has no query tokens to replace (AMIG needs at least one; "
                "e.g. a causal template with [Y] first)")
        for i in q.query_positions:
            var_q.append(g)
            var_i.append(i)
    var_q_t = torch.as_tensor(var_q, device=lm.device)
    ids = grp.ids[var_q_t].clone()  # [V, S]
    ids[torch.arange(len(var_q), device=lm.device), torch.as_tensor(var_i, device=lm.device)] = repl
    mask = grp.mask[var_q_t]  # [V, S]
    # baseline rows: for each unit, each variant of its query
    base_var, base_pos, unit_bases = [], [], []
    for g, p in zip(grp.unit_q, grp.unit_pos):
        mine = [v for v, vq in enumerate(var_q) if vq == g]
        unit_bases.append(list(range(len(base_var), len(base_var) + len(mine))))
        base_var.extend(mine)
        base_pos.extend([int(p)] * len(mine))
    bv = np.asarray(base_var)
    bp = np.asarray(base_pos)
    out = torch.empty((len(base_var), len(layers), lm.d_ff), dtype=torch.float32,
                      device=lm.device)  # [n_baselines, nL, d_ff]
    for start in range(0, len(var_q), batch_size):
        stop = min(start + batch_size, len(var_q))
        with torch.inference_mode(), capture_ffn(lm, layers, site) as acts:
            # the blocks alone: the baselines need no logits
            lm.model.base_model(input_ids=ids[start:stop], attention_mask=mask[start:stop])
            sel = np.nonzero((bv >= start) & (bv < stop))[0]
            rows = torch.as_tensor(bv[sel] - start, device=lm.device)
            pos = torch.as_tensor(bp[sel], device=lm.device)
            vals = torch.stack([acts[layer][rows, pos].float() for layer in layers], dim=1)
        out[torch.as_tensor(sel, device=lm.device)] = vals.clone()
    return out, unit_bases


def _patcher(rows: torch.Tensor, pos: torch.Tensor, x: torch.Tensor):
    """Replace act[rows[r], pos[r], :] by x[r] (out of place, so gradients reach x)."""
    def fn(act: torch.Tensor) -> torch.Tensor:  # act: [batch, seq, d_ff]
        return act.index_put((rows, pos), x.to(act.dtype))
    return fn


def _no_extras(call: dict) -> dict:
    """A block call's keyword arguments without cache writes or attention-weight outputs."""
    for k in ("use_cache", "output_attentions"):
        if k in call:
            call[k] = False
    return call


def _full_block(lm: LanguageModel, grp: _Group, j: int, h: torch.Tensor, rows: torch.Tensor,
                patch: tuple | None = None) -> torch.Tensor:
    """Block ``j`` on every position of ``h`` [n, S, hidden], its other arguments those of the
    captured call at capture rows ``rows``; ``patch`` = (batch rows, positions, x [m, d_ff],
    site) replaces the FFN activation there. Returns [n, S, hidden]."""
    block = lm.blocks()[j]
    args, kwargs = grp.blocks[j]
    n_cap = grp.ids.shape[0]
    call = _no_extras({k: _index_batch(v, rows, n_cap)
                       for k, v in _as_kwargs(block, args, kwargs).items()})
    ctx = contextlib.nullcontext() if patch is None else ffn_hooks(
        lm, {j: _patcher(*patch[:3])}, patch[3])
    with ctx:
        out = block(h, **call)
    return out[0] if isinstance(out, tuple) else out


def _run_fast(lm: LanguageModel, grp: _Group, r_q: torch.Tensor, r_pos: torch.Tensor,
              r_layer: np.ndarray, x: torch.Tensor, site: str) -> torch.Tensor:
    """Hidden states [R, hidden] after the last block at each row's position; rows sorted by
    layer; row r patched at block r_layer[r] with x[r]."""
    h = None  # [active rows, S, hidden]
    for j in range(int(r_layer[0]), lm.n_layers):
        start, stop = np.searchsorted(r_layer, [j, j + 1])
        patch = None
        if stop > start:
            new = grp.blocks[j][0][0].index_select(0, r_q[start:stop])  # [n_new, S, hidden]
            h = new if h is None else torch.cat([h, new], dim=0)
            patch = (torch.arange(start, stop, device=lm.device), r_pos[start:stop],
                     x[start:stop], site)
        h = _full_block(lm, grp, j, h, r_q[: h.shape[0]], patch)
    return h[torch.arange(h.shape[0], device=h.device), r_pos]  # [R, hidden]


class _PrefixCache:
    """Stands in for a model's KV cache in a one-position block call: the block appends the
    key/value of its single new position to given keys/values of the whole input; the
    attention mask says which of them the position sees."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # [R, H, S, d]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        # key/value_states: [R, H, 1, d] -> [R, H, S + 1, d]
        return (torch.cat([self.keys.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.values.to(value_states.dtype), value_states], dim=2))


def _at_positions(obj, rows: torch.Tensor, pos: torch.Tensor, n_cap: int):
    """Rotary cos/sin [G or 1, S, d] and position ids [G or 1, S] of the capture, taken at
    each row's own position: [R, 1, d] / [R, 1]."""
    if isinstance(obj, tuple):
        return tuple(_at_positions(o, rows, pos, n_cap) for o in obj)
    if isinstance(obj, torch.Tensor) and obj.ndim >= 2:
        src = rows if obj.shape[0] == n_cap else torch.zeros_like(rows)
        return obj[src, pos].unsqueeze(1)
    return obj


def _as_kwargs(block: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """A captured block call as keyword arguments, without the hidden states (the first)."""
    sig = inspect.signature(block.forward)
    bound = sig.bind_partial(*args, **kwargs).arguments
    out: dict = {}
    for i, (name, value) in enumerate(bound.items()):
        if i == 0:
            continue
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _one_position(lm: LanguageModel, grp: _Group, j: int, h1: torch.Tensor,
                  rows: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, allowed: torch.Tensor, patch_rows: torch.Tensor | None,
                  x: torch.Tensor | None, site: str) -> torch.Tensor:
    """Block ``j`` run on one position per row, ``h1`` [n, 1, hidden], attending to ``keys``/
    ``values`` [n, H, S, d] where ``allowed`` [n, S + 1] is true (its last column: the
    position's own new key); the FFN activation of ``patch_rows`` replaced by ``x``
    [len(patch_rows), d_ff]. Returns the block output [n, 1, hidden]."""
    block = lm.blocks()[j]
    args, kwargs = grp.blocks[j]
    n_cap = grp.ids.shape[0]
    if grp.attn_impl == "sdpa":
        mask = allowed[:, None, None, :]  # [n, 1, 1, S + 1] bool, True = attend
    else:
        neg = torch.finfo(h1.dtype).min
        mask = torch.zeros(allowed.shape, dtype=h1.dtype, device=h1.device).masked_fill(
            ~allowed, neg)[:, None, None, :]  # additive
    call = {k: _at_positions(v, rows, pos, n_cap) if k in ("position_embeddings",
                                                           "position_ids") else v
            for k, v in _as_kwargs(block, args, kwargs).items()}
    call.update({grp.cache_arg: _PrefixCache(keys, values), "attention_mask": mask})
    call.pop("cache_position", None)
    _no_extras(call)
    ctx = contextlib.nullcontext() if patch_rows is None else ffn_hooks(
        lm, {j: _patcher(patch_rows, torch.zeros_like(patch_rows), x)}, site)
    with ctx:
        out = block(h1, **call)
    return out[0] if isinstance(out, tuple) else out


def _run_causal(lm: LanguageModel, grp: _Group, r_q: torch.Tensor, r_pos: torch.Tensor,
                r_layer: np.ndarray, x: torch.Tensor, site: str) -> torch.Tensor:
    """Like :func:`_run_fast`, for causal LMs, one position per row: a patch at position p
    changes no earlier position, so every block runs on position p alone and attends to the
    cached (unpatched) keys/values of positions < p. Hidden states [R, hidden]."""
    width = grp.ids.shape[1]
    h = None  # [active rows, 1, hidden]
    for j in range(int(r_layer[0]), lm.n_layers):
        start, stop = np.searchsorted(r_layer, [j, j + 1])
        if stop > start:
            new = grp.blocks[j][0][0][r_q[start:stop], r_pos[start:stop]].unsqueeze(1)
            h = new if h is None else torch.cat([h, new], dim=0)  # [n, 1, hidden]
        n = h.shape[0]
        rows, pos = r_q[:n], r_pos[:n]
        keys, values = grp.kv[j]
        allowed = torch.cat([torch.arange(width, device=h.device)[None, :] < pos[:, None],
                             torch.ones((n, 1), dtype=torch.bool, device=h.device)], dim=1)
        joined = torch.arange(start, stop, device=h.device) if stop > start else None
        h = _one_position(lm, grp, j, h, rows, pos, keys.index_select(0, rows),
                          values.index_select(0, rows), allowed, joined,
                          x[start:stop] if joined is not None else None, site)
    return h[:, 0]  # [R, hidden]


def _run_masked(lm: LanguageModel, grp: _Group, r_q: torch.Tensor, r_pos: torch.Tensor,
                r_layer: np.ndarray, x: torch.Tensor, site: str) -> torch.Tensor:
    """Like :func:`_run_fast`, for masked LMs, with two blocks run on one position per row:

    * the patched block l: only position p's activation changes, and what follows the FFN
      activation in a block is position-wise, so its other positions' outputs are the
      unpatched ones (the captured input of block l + 1); position p attends to the
      unpatched keys/values of block l;
    * the last block: only position p's output is read, so it runs on position p, attending
      to keys/values computed from the (patched) input of all positions.

    Hidden states [R, hidden] after the last block at each row's position."""
    last = lm.n_layers - 1
    real = grp.mask.bool()  # [G, S]
    no_self = torch.zeros((len(r_q), 1), dtype=torch.bool, device=real.device)
    h = None  # [active rows, S, hidden]: rows that passed their patched block
    for j in range(int(r_layer[0]), lm.n_layers):
        start, stop = np.searchsorted(r_layer, [j, j + 1])
        outs = []
        if h is not None:
            n = h.shape[0]
            rows = r_q[:n]
            if j < last:
                h = _full_block(lm, grp, j, h, rows)
            else:
                keys, values = lm.spec.kv(lm.blocks()[j], h)  # [n, H, S, d]
                pos = r_pos[:n]
                h1 = h[torch.arange(n, device=h.device), pos].unsqueeze(1)
                outs.append(_one_position(lm, grp, j, h1, rows, pos, keys, values,
                                          torch.cat([real[rows], no_self[:n]], dim=1),
                                          None, None, site)[:, 0])
        if stop > start:
            rows, pos = r_q[start:stop], r_pos[start:stop]
            keys, values = grp.kv[j]
            h1 = grp.blocks[j][0][0][rows, pos].unsqueeze(1)  # [m, 1, hidden]
            o = _one_position(lm, grp, j, h1, rows, pos, keys.index_select(0, rows),
                              values.index_select(0, rows),
                              torch.cat([real[rows], no_self[: stop - start]], dim=1),
                              torch.arange(stop - start, device=h1.device), x[start:stop],
                              site)  # [m, 1, hidden]
            if j < last:
                full = grp.blocks[j + 1][0][0].index_select(0, rows)  # [m, S, hidden]
                full = full.index_put((torch.arange(stop - start, device=full.device), pos),
                                      o[:, 0].to(full.dtype))
                h = full if h is None else torch.cat([h, full], dim=0)
            else:
                outs.append(o[:, 0])
    return torch.cat(outs, dim=0)  # [R, hidden]


def _run_fallback(lm: LanguageModel, grp: _Group, r_q: torch.Tensor, r_pos: torch.Tensor,
                  r_layer: np.ndarray, x: torch.Tensor, site: str) -> torch.Tensor:
    """Logits [R, V] at each row's position from the full model with per-layer hooks."""
    fns = {}
    for j in np.unique(r_layer):
        start, stop = np.searchsorted(r_layer, [j, j + 1])
        idx = torch.arange(start, stop, device=lm.device)
        fns[int(j)] = _patcher(idx, r_pos[start:stop], x[start:stop])
    with ffn_hooks(lm, fns, site):
        logits = lm.model(input_ids=grp.ids[r_q], attention_mask=grp.mask[r_q],
                          use_cache=False).logits  # [R, S, V]
    return logits[torch.arange(len(r_q), device=lm.device), r_pos]


def default_batch_size(lm: LanguageModel) -> int:
    """Rows per pass. On a GPU 4096 where it has 40 GiB or more (on an H200 every measured
    shape ran fastest at 4096 or within 3 % of it, BERT-base in 22 GiB; docs/performance.md),
    else 1024 (BERT-base in 6 GiB). On the CPU 64 for masked LMs, whose blocks run on every
    position (larger batches fall out of cache), and 256 for causal LMs with a registered
    head, whose rows are one position each and whose time is mostly the LM head's
    vocabulary-sized products, faster in larger batches."""
    if lm.device.type == "cuda":
        memory = torch.cuda.get_device_properties(lm.device).total_memory
        return 4096 if memory >= 40 * 2**30 else 1024
    if lm.device.type != "cpu":
        return 1024
    return 256 if lm.arch == "causal" and lm.spec.head is not None else 64


def attribute(lm: LanguageModel, queries: Sequence[EncodedQuery], *, method: str = "amig",
              steps: int = 20, quadrature: str = "riemann", layers: Sequence[int] | None = None,
              batch_size: int | None = None, autocast: bool = False, site: str = "post"
              ) -> list[Attribution]:
    r"""Attribution scores of every FFN neuron for each query.

    For layer l, object token t (activation a at its position, P = P(token t) there, only
    layer l patched) and baseline a':

        score_j = (a_j - a'_j) * \int_0^1 dP/da_j(a' + alpha (a - a')) dalpha
                ~ (a_j - a'_j) * sum_k w_k dP/da_j(a' + alpha_k (a - a'))

    ``ig``: a' = 0. ``amig``: mean of the above over the baselines a'_i, i in the query
    tokens, a'_i = the activation when token i is replaced by the mask (masked LM) or
    end-of-text (causal LM) token. Scores are averaged over the object's tokens. Completeness:
    sum_j score_j -> P(a) - P(a') (averaged over baselines/tokens) as steps grow.

    Raises ``ValueError`` for ``amig`` on a query without query tokens (a causal template
    with ``[Y]`` first has only its start token).

    ``batch_size``: rows (interpolation points) per forward/backward (default:
    :func:`default_batch_size`).
    ``layers``: attributed layers (default all; others score 0). ``site="pre"``: attribute
    w.r.t. the FFN pre-activation instead of the post-nonlinearity activation. ``autocast``:
    bf16 autocast for the gradient passes (GPU option).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    alphas, weights = quadrature_rule(steps, quadrature)
    layers = sorted(set(range(lm.n_layers) if layers is None else (int(x) for x in layers)))
    if not layers or layers[0] < 0 or layers[-1] >= lm.n_layers:
        raise ValueError(f"layers must be within 0..{lm.n_layers - 1}")
    for layer in layers:
        site_module(lm, layer, site)  # validates site for this architecture
    if batch_size is None:
        batch_size = default_batch_size(lm)
    batch_size = max(1, int(batch_size))
    n_l, dev = len(layers), lm.device
    layer_arr = np.asarray(layers)
    alphas_t = torch.as_tensor(alphas, dtype=torch.float32, device=dev)
    weights_t = torch.as_tensor(weights, dtype=torch.float32, device=dev)
    results: list[Attribution | None] = [None] * len(queries)
    order = sorted(range(len(queries)), key=lambda i: len(queries[i].input_ids))
    run = _run_fast if lm.spec.head is not None else _run_fallback

    with _frozen(lm.model):
        for g0 in range(0, len(order), _GROUP):
            qids = order[g0:g0 + _GROUP]
            qs = [queries[i] for i in qids]
            with record_function("kneurons.capture"):
                grp = _capture(lm, qs, qids, layers, site)
            run_grp = run if grp.kv is None else \
                _run_causal if lm.arch == "causal" else _run_masked
            n_u = len(grp.unit_q)
            if method == "ig":
                bases = torch.zeros((n_u, n_l, lm.d_ff), device=dev)  # [U, nL, d_ff]
                unit_bases = [[u] for u in range(n_u)]
            else:
                with record_function("kneurons.baselines"):
                    bases, unit_bases = _amig_baselines(lm, qs, grp, layers, site, batch_size)
            # rows: (unit, layer index, baseline, step), sorted by layer
            rows = [(li, u, b, k) for li in range(n_l) for u in range(n_u)
                    for b in unit_bases[u] for k in range(steps)]
            r = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
            r_li, r_u, r_b, r_k = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
            nb = np.asarray([len(unit_bases[u]) for u in range(n_u)])
            r_scale = torch.as_tensor(1.0 / (nb[r_u] * grp.unit_nt[r_u]), dtype=torch.float32,
                                      device=dev)
            scores = torch.zeros((len(qs) * n_l, lm.d_ff), dtype=torch.float32, device=dev)
            for s0 in range(0, len(r), batch_size):
                sl = slice(s0, s0 + batch_size)
                li_t = torch.as_tensor(r_li[sl], device=dev)
                u_t = torch.as_tensor(r_u[sl], device=dev)
                a = grp.acts[u_t, li_t]  # [R, d_ff]
                b = bases[torch.as_tensor(r_b[sl], device=dev), li_t]  # [R, d_ff]
                k_t = torch.as_tensor(r_k[sl], device=dev)
                x = (b + alphas_t[k_t, None] * (a - b)).requires_grad_(True)  # [R, d_ff] leaf
                r_q = torch.as_tensor(grp.unit_q[r_u[sl]], device=dev)
                r_pos = torch.as_tensor(grp.unit_pos[r_u[sl]], device=dev)
                tgt = torch.as_tensor(grp.unit_tgt[r_u[sl]], device=dev)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                    with record_function("kneurons.blocks.forward"):
                        out = run_grp(lm, grp, r_q, r_pos, layer_arr[r_li[sl]], x, site)
                    if run is _run_fast:  # out: hidden states [R, hidden]
                        with record_function("kneurons.head"):
                            grad_out = _head_gradient(lm, out, tgt)  # [R, hidden]
                    else:  # out: logits [R, V]
                        grad_out = None
                with record_function("kneurons.blocks.backward"):
                    if grad_out is None:
                        (grad,) = torch.autograd.grad(object_prob(out, tgt).sum(), x)
                    else:
                        (grad,) = torch.autograd.grad(out, x, grad_outputs=grad_out)  # [R, d_ff]
                contrib = (a - b) * grad * (weights_t[k_t] * r_scale[sl])[:, None]
                scores.index_add_(0, r_q * n_l + li_t, contrib)
            scores = scores.view(len(qs), n_l, lm.d_ff).cpu().numpy()
            probs = torch.softmax(grp.logits, dim=-1)  # [U, V]
            for g, qi in enumerate(qids):
                units = np.nonzero(grp.unit_q == g)[0]
                full = np.zeros((lm.n_layers, lm.d_ff), dtype=np.float32)
                full[layer_arr] = scores[g]
                u_t = torch.as_tensor(units, device=dev)
                tg = torch.as_tensor(grp.unit_tgt[units], device=dev)
                tp = probs[u_t, tg].cpu().numpy().astype(np.float32)
                lg0 = grp.logits[units[0]]
                rank = int((lg0 > lg0[int(grp.unit_tgt[units[0]])]).sum().item()) + 1
                predicted = bool((grp.logits[u_t].argmax(-1) == tg).all().item())
                results[qi] = Attribution(full, tp, float(tp.mean()), rank, predicted)
    return results  # type: ignore[return-value]


class _ObjectProb(torch.autograd.Function):
    """P(y_r) = softmax(z_r)[y_r] per row of logits z [R, V], with the exact gradient
    dP/dz = P (e_y - softmax(z)) written over the saved logits in place: one pass over the
    vocabulary forward (log-sum-exp) and one backward, no [R, V] softmax kept beside them."""

    CHUNK = 8  # rows per pass over the vocabulary: their temporaries stay in the cache

    @staticmethod
    def forward(ctx, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = _ObjectProb.CHUNK
        lse = torch.cat([torch.logsumexp(z[i:i + c], dim=-1, keepdim=True)
                         for i in range(0, z.shape[0], c)])  # [R, 1]
        p = (z.gather(1, y[:, None]) - lse).exp_()  # [R, 1]
        ctx.save_for_backward(z, lse, p, y)
        return p[:, 0]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, lse, p, y = ctx.saved_tensors
        gp = g[:, None] * p  # [R, 1]
        c = _ObjectProb.CHUNK
        for i in range(0, z.shape[0], c):  # -g P softmax(z), over the logits' storage
            z[i:i + c].sub_(lse[i:i + c]).exp_().mul_(-gp[i:i + c])
        z.scatter_add_(1, y[:, None], gp)
        return z, None


def object_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """P(target) [R] from logits [R, V] (float32), differentiable; the logits must not be
    used again after the backward (their storage holds the gradient then)."""
    z = logits.float()
    if z is logits and logits.requires_grad and logits.grad_fn is None:
        z = z.clone()  # a leaf: never overwrite the caller's tensor
    return _ObjectProb.apply(z, targets)


def _head_gradient(lm: LanguageModel, hidden: torch.Tensor, targets: torch.Tensor
                   ) -> torch.Tensor:
    """d sum_r P(targets[r] | hidden[r]) / d hidden [R, hidden]: the LM head (final norm,
    output embeddings, soft cap) on its own graph. Its two vocabulary-sized products are most
    of a query's time for large vocabularies; the blocks' graph then takes this gradient."""
    leaf = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        p = object_prob(lm.spec.head(lm.model, leaf), targets)
        (grad,) = torch.autograd.grad(p.sum(), leaf)
    return grad


def probability_gap(lm: LanguageModel, query: EncodedQuery, *, method: str = "amig",
                    layers: Sequence[int] | None = None, site: str = "post") -> np.ndarray:
    """What the scores of each layer must add up to (the completeness property, the
    attribution's convergence check): per layer l, the mean over the object's tokens t of

        P_t(a) - mean over baselines a' of P_t(a'),

    P_t(x) = P(object token t) with layer l's activation at t's position set to x (``ig``:
    the single baseline 0; ``amig``: the query-token baselines). Computed with direct forward
    passes, independently of :func:`attribute`; ``scores[l].sum() - gap[l]`` is the
    integration error, which falls with ``steps`` (see ``benchmarks/attribution.py``).

    Returns [n_layers] float64 (0 where a layer is not in ``layers``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    layers = list(range(lm.n_layers)) if layers is None else sorted(set(layers))
    dev = lm.device
    ids = torch.as_tensor([query.input_ids], device=dev)  # [1, S]
    pos = torch.as_tensor(query.target_positions, device=dev)  # [T]

    with torch.inference_mode():
        with capture_ffn(lm, layers, site) as acts, head_at(lm, pos[None, :]) as sliced:
            logits = lm.model(input_ids=ids).logits  # [1, T or S, vocab]
        p_a = object_token_probs(logits if sliced[0] else logits[:, pos],
                                 query.target_ids)[0]  # [T]
        if method == "ig":
            base = {layer: torch.zeros((1, len(pos), lm.d_ff), device=dev) for layer in layers}
        else:
            if not query.query_positions:
                raise ValueError("AMIG needs at least one query token to replace")
            variants = ids.repeat(len(query.query_positions), 1)  # [B, S]
            variants[torch.arange(len(query.query_positions)),
                     torch.as_tensor(query.query_positions, device=dev)] = lm.replacement_id
            with capture_ffn(lm, layers, site) as acts:
                lm.model.base_model(input_ids=variants)  # the activations only, no logits
            base = {layer: acts[layer][:, pos].float() for layer in layers}  # [B, T, d_ff]
        gap = np.zeros(lm.n_layers)
        for layer in layers:
            b = base[layer]  # [B, T, d_ff]
            total = 0.0
            for t in range(len(pos)):
                p_b = replaced_token_probs(lm, query, layer, pos[t], b[:, t], site=site)[:, t]
                total += float(p_a[t]) - float(p_b.double().mean())  # p_b: [B]
            gap[layer] = total / len(pos)
    return gap


def gradient_x_input(lm: LanguageModel, queries: Sequence[EncodedQuery], *,
                     layers: Sequence[int] | None = None, site: str = "post",
                     batch_size: int = 16) -> list[np.ndarray]:
    r"""Gradient x input of every FFN neuron for each query: [n_layers, d_ff] float32 each,

        score_lj = a_lj * dP/da_lj,

    a_l the activation of layer l at an object token's position, P = P(that token), mean over
    the object's tokens as in :func:`attribute` (layers not in ``layers`` stay 0). The
    derivative is the total one: a zero-valued leaf is added to every layer's activation at
    the object position through a hook (the graph is not cut), so one forward and one
    backward per batch of (query, object token) rows give every layer's gradient, the
    effects through later layers included. It equals :func:`attribute`'s integrand at
    alpha = 1; a method-free ranking (no baseline, no path), and, where P(alpha a_l) does not
    depend on alpha > 0 (an RMSNorm on the FFN output, Gemma), exactly zero-baseline IG
    divided by the quadrature's mean of 1/alpha_k.
    """
    from .hooks import ffn_hooks as _hooks
    from .queries import pad_queries as _pad
    from .scoring import head_at as _head_at

    layers = sorted(set(range(lm.n_layers) if layers is None else (int(x) for x in layers)))
    if not layers or layers[0] < 0 or layers[-1] >= lm.n_layers:
        raise ValueError(f"layers must be within 0..{lm.n_layers - 1}")
    out = [np.zeros((lm.n_layers, lm.d_ff), dtype=np.float32) for _ in queries]
    units = [(i, t) for i, q in enumerate(queries) for t in range(len(q.target_ids))]
    dev = lm.device
    flags = [(p, p.requires_grad) for p in lm.model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)  # only the leaves need gradients
        for start in range(0, len(units), max(1, int(batch_size))):
            chunk = units[start:start + max(1, int(batch_size))]
            ids, mask = _pad(lm, [queries[i] for i, _ in chunk])  # [B, S]
            rows = torch.arange(len(chunk), device=dev)  # [B]
            pos = torch.as_tensor([queries[i].target_positions[t] for i, t in chunk],
                                  device=dev)  # [B]
            tgt = torch.as_tensor([queries[i].target_ids[t] for i, t in chunk], device=dev)
            leaves: dict[int, torch.Tensor] = {}
            acts: dict[int, torch.Tensor] = {}

            def adder(layer: int):
                def fn(act: torch.Tensor) -> torch.Tensor:  # act: [B, S, d_ff]
                    leaf = torch.zeros((act.shape[0], act.shape[2]), dtype=act.dtype,
                                       device=act.device, requires_grad=True)  # [B, d_ff]
                    leaves[layer] = leaf
                    acts[layer] = act[rows, pos].detach().float()  # [B, d_ff]
                    return act.index_put((rows, pos), leaf, accumulate=True)
                return fn

            with torch.enable_grad(), _hooks(lm, {layer: adder(layer) for layer in layers},
                                             site), _head_at(lm, pos[:, None]) as sliced:
                logits = lm.model(input_ids=ids, attention_mask=mask).logits  # [B, 1|S, V]
                row = logits[:, 0] if sliced[0] else logits[rows, pos]  # [B, V]
                p = torch.softmax(row.float(), dim=-1)[rows, tgt]  # [B]
                grads = torch.autograd.grad(p.sum(), [leaves[layer] for layer in layers])
            for layer, grad in zip(layers, grads):
                contrib = (acts[layer] * grad.float()).cpu().numpy()  # [B, d_ff]
                for b, (i, _) in enumerate(chunk):
                    out[i][layer] += contrib[b] / len(queries[i].target_ids)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return out
