"""Neuron attribution: integrated gradients (IG, Dai et al. 2022) and AMIG (Chen et al. 2024).

Engine design (all steps of a layer, several layers and several queries in one pass):

1. One unpatched forward per group of captured inputs (right-padded, with attention mask)
   records the FFN activation ``a`` at every attributed layer, the probabilities of the
   object, and, via forward pre-hooks, the exact inputs (hidden states + mask/rotary kwargs)
   of every block.
2. AMIG only: one batched forward over all "query token i replaced" variants records the
   baseline activations ``a'_i`` of all layers at once (``torch.inference_mode``).
3. Every (unit, layer, baseline, quadrature node) is one *row*; a unit is one object token's
   position. Rows are sorted by layer and cut into batches of ``batch_size``. A batch starts
   at the lowest patched layer ``l0`` and walks blocks ``l0..L-1``: rows of layer ``j`` join
   the batch at block ``j`` from its cached input, and block ``j``'s FFN activation is
   replaced at the object position by the row's interpolation point (a leaf tensor). Blocks
   below a row's layer are never recomputed. The LM head runs only at the object positions;
   one backward gives every row's gradient. Architectures without a registered ``head`` use
   a slower fallback: the full model on the repeated inputs, with one hook per patched layer.
4. One-position blocks (exact, for sdpa and eager attention): a causal LM runs every block of
   a row on the object position alone, attending to the cached keys/values of the earlier
   positions (a patch at position p changes no earlier position); a masked LM runs the
   patched block (only position p changes in it) and the last block (only position p is
   read) on the object position alone. Keys/values reach the model's own attention through a
   stand-in for its KV cache (``_PrefixCache``), the visible positions through the mask.
5. Shared passes (:func:`_plan`): queries with the same input and query tokens (a fact's true
   and wrong candidates) are captured once and share the baselines' pass; a causal LM's
   input that begins another's is read from that one. Object tokens read at the same
   position after the same input share a unit: its rows run once through the blocks and the
   LM head, and each target gets its gradient from the one set of logits
   (:func:`_head_gradients`: one vocabulary-sized product for all targets, then one backward
   through the rows' blocks per target).

The same machinery, without gradients, runs the rows of DKN detection's suppressions
(:class:`ErasedRows`: several erased neurons per row, in several layers, on all object
positions) and of the convergence check (:func:`probability_gap`).

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
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.profiler import record_function

from .hooks import SITES, capture_block_inputs, capture_ffn, ffn_hooks, site_module
from .models import LanguageModel
from .queries import EncodedQuery, pad_queries
from .scoring import head_at, object_token_probs

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
    """Everything cached for one padding group of captured inputs (G inputs, U units). A
    *unit* is one position of one captured input whose output is read: every query (and
    object token) with that input and position shares it (see :func:`_plan`)."""

    qids: list[int]               # query index of each captured input (for messages)
    ids: torch.Tensor             # [G, S] input ids
    mask: torch.Tensor            # [G, S] attention mask
    unit_q: np.ndarray            # [U] group row of each unit
    unit_pos: np.ndarray          # [U] position of the unit
    acts: torch.Tensor            # [U, nL, d_ff] activation a at the unit position
    blocks: dict                  # layer -> (args, kwargs) of the block call, batch G
    logits: torch.Tensor | None   # [U, V] unpatched logits at the unit positions
    kv: dict | None = None        # one-position paths: layer -> unpatched (keys, values)
                                  # [G, H, S, d] of the block's attention
    cache_arg: str | None = None  # name of the block's cache argument
    attn_impl: str = "eager"      # the model's attention implementation
    last: torch.Tensor | None = None  # [U, hidden] the last block's output at the units
                                      # (captured without logits)


def _units_of(queries: Sequence[EncodedQuery]) -> tuple[np.ndarray, np.ndarray]:
    """One unit per object token of each query (group row, position)."""
    unit_q = [g for g, q in enumerate(queries) for _ in q.target_positions]
    unit_pos = [p for q in queries for p in q.target_positions]
    return np.asarray(unit_q, dtype=np.int64), np.asarray(unit_pos, dtype=np.int64)


def _capture(lm: LanguageModel, queries: Sequence[EncodedQuery], qids: list[int],
             unit_q: np.ndarray, unit_pos: np.ndarray, layers: list[int], site: str,
             logits: bool = True) -> _Group:
    """The unpatched forward of ``queries`` (the captured inputs, padded together), read at
    the units (group row ``unit_q[u]``, position ``unit_pos[u]``). ``logits=False`` (models
    with a registered head): the blocks alone, keeping the last block's output at the units
    in ``grp.last`` [U, hidden] instead of the logits, for a caller that runs the head on
    them together with its rows' (on the CPU each call of a large vocabulary's head streams
    the whole output embedding matrix, whatever the rows)."""
    ids, mask = pad_queries(lm, queries)
    unit_t, seen = [], {}  # the unit's index among its row's units
    for g in unit_q.tolist():
        unit_t.append(seen.get(g, 0))
        seen[g] = unit_t[-1] + 1
    uq = torch.as_tensor(unit_q, device=lm.device)
    up = torch.as_tensor(unit_pos, device=lm.device)
    ut = torch.as_tensor(unit_t, device=lm.device)
    fast = lm.spec.head is not None
    causal = fast and lm.arch == "causal"
    block_layers = range(min(layers), lm.n_layers) if fast else []
    # the LM head only at the units' positions: at [G, T], unit u is at[unit_q[u], unit_t[u]]
    at = torch.zeros((len(queries), max(unit_t) + 1), dtype=torch.long, device=lm.device)
    at[uq, ut] = up
    blocks_only = fast and not logits
    last: list[torch.Tensor] = []  # blocks_only: the last block's output [G, S, hidden]
    hook = lm.blocks()[-1].register_forward_hook(
        lambda mod, args, out: last.append(out[0] if isinstance(out, tuple) else out)
    ) if blocks_only else None
    run = lm.model.base_model if blocks_only else lm.model
    heads = contextlib.nullcontext([False]) if blocks_only else head_at(lm, at)
    # no_grad, not inference_mode: the cached block inputs feed the gradient passes
    try:
        with torch.no_grad(), capture_block_inputs(lm, block_layers) as calls, \
                capture_ffn(lm, layers, site) as acts, heads as sliced:
            out = run(input_ids=ids, attention_mask=mask, use_cache=causal)
    finally:
        if hook is not None:
            hook.remove()
    a = torch.stack([acts[layer][uq, up].float() for layer in layers], dim=1)  # [U, nL, d_ff]
    grp = _Group(qids, ids, mask, np.asarray(unit_q), np.asarray(unit_pos), a, dict(calls),
                 None)
    if last:
        grp.last = last[-1][uq, up]  # [U, hidden]
    else:
        grp.logits = (out.logits[uq, ut] if sliced[0] else out.logits[uq, up]).float()  # [U, V]
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


# A row's activation changes, as the runners below ask for them: patch(j, first, stop, full)
# returns the function (act -> act) to apply to the FFN activation of block j in a call that
# runs batch rows first..stop-1 (act: [stop - first, S or T, d_ff]; ``full``: every position
# of the input, else the rows' own T positions in order), or None when those rows keep it.
Patch = Callable[[int, int, int, bool], "Callable[[torch.Tensor], torch.Tensor] | None"]


def _entry_patch(r_layer: np.ndarray, r_pos: torch.Tensor, x: torch.Tensor) -> Patch:
    """Attribution rows: row r's activation at its (one) position set to x[r] in its entry
    block r_layer[r] (rows sorted by layer), and nowhere else."""
    def patch(j: int, first: int, stop: int, full: bool):
        start, end = np.searchsorted(r_layer, [j, j + 1])
        lo, hi = max(int(start), first), min(int(end), stop)
        if hi <= lo:
            return None
        rows = torch.arange(lo - first, hi - first, device=x.device)
        return _patcher(rows, r_pos[lo:hi, 0] if full else torch.zeros_like(rows), x[lo:hi])
    return patch


def _zero_patch(sets: Sequence[Sequence[tuple[int, int]]], r_pos: torch.Tensor) -> Patch:
    """Suppression rows: row r's neurons ``sets[r]`` (layer, index) set to 0 at all of the
    row's positions, in their layers' blocks."""
    by_layer: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    pairs = sorted((layer, r, neuron) for r, s in enumerate(sets) for layer, neuron in s)
    for layer in sorted({p[0] for p in pairs}):
        mine = [(r, n) for lyr, r, n in pairs if lyr == layer]
        by_layer[layer] = (np.asarray([r for r, _ in mine]), np.asarray([n for _, n in mine]))
    n_t = r_pos.shape[1]

    def patch(j: int, first: int, stop: int, full: bool):
        if j not in by_layer:
            return None
        rows, neurons = by_layer[j]
        lo, hi = np.searchsorted(rows, [first, stop])
        if hi <= lo:
            return None
        dev = r_pos.device
        rr = torch.as_tensor(rows[lo:hi] - first, device=dev)[:, None]  # [m, 1]
        nn_ = torch.as_tensor(neurons[lo:hi], device=dev)[:, None]  # [m, 1]
        pos = (r_pos[torch.as_tensor(rows[lo:hi], device=dev)] if full else
               torch.arange(n_t, device=dev).expand(hi - lo, n_t))  # [m, T]

        def fn(act: torch.Tensor) -> torch.Tensor:  # act: [n, S or T, d_ff]
            return act.index_put((rr, pos, nn_), torch.zeros((), dtype=act.dtype,
                                                             device=act.device))
        return fn
    return patch


def _no_extras(call: dict) -> dict:
    """A block call's keyword arguments without cache writes or attention-weight outputs."""
    for k in ("use_cache", "output_attentions"):
        if k in call:
            call[k] = False
    return call


def _full_block(lm: LanguageModel, grp: _Group, j: int, h: torch.Tensor, rows: torch.Tensor,
                fn=None, site: str = "post") -> torch.Tensor:
    """Block ``j`` on every position of ``h`` [n, S, hidden], its other arguments those of the
    captured call at capture rows ``rows``; ``fn`` (act -> act) changes the FFN activation
    [n, S, d_ff]. Returns [n, S, hidden]."""
    block = lm.blocks()[j]
    args, kwargs = grp.blocks[j]
    n_cap = grp.ids.shape[0]
    call = _no_extras({k: _index_batch(v, rows, n_cap)
                       for k, v in _as_kwargs(block, args, kwargs).items()})
    ctx = contextlib.nullcontext() if fn is None else ffn_hooks(lm, {j: fn}, site)
    with ctx:
        out = block(h, **call)
    return out[0] if isinstance(out, tuple) else out


def _run_fast(lm: LanguageModel, grp: _Group, r_q: torch.Tensor, r_pos: torch.Tensor,
              r_layer: np.ndarray, patch: Patch, site: str) -> torch.Tensor:
    """Hidden states [R, T, hidden] after the last block at each row's positions r_pos
    [R, T]; rows sorted by their entry layer r_layer, each run from the cached input of its
    entry block on every position, its activations changed by ``patch``."""
    h = None  # [active rows, S, hidden]
    for j in range(int(r_layer[0]), lm.n_layers):
        start, stop = np.searchsorted(r_layer, [j, j + 1])
        if stop > start:
            new = grp.blocks[j][0][0].index_select(0, r_q[start:stop])  # [n_new, S, hidden]
            h = new if h is None else torch.cat([h, new], dim=0)
        h = _full_block(lm, grp, j, h, r_q[: h.shape[0]], patch(j, 0, h.shape[0], True), site)
    return h[torch.arange(h.shape[0], device=h.device)[:, None], r_pos]  # [R, T, hidden]


class _PrefixCache:
    """Stands in for a model's KV cache in a one-position block call: the block appends the
    key/value of its new positions to given keys/values of the whole input; the attention
    mask says which of them each position sees."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # [R, H, S, d]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        # key/value_states: [R, H, T, d] -> [R, H, S + T, d]
        return (torch.cat([self.keys.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.values.to(value_states.dtype), value_states], dim=2))


def _at_positions(obj, rows: torch.Tensor, pos: torch.Tensor, n_cap: int):
    """Rotary cos/sin [G or 1, S, d] and position ids [G or 1, S] of the capture, taken at
    each row's own positions pos [R, T]: [R, T, d] / [R, T]."""
    if isinstance(obj, tuple):
        return tuple(_at_positions(o, rows, pos, n_cap) for o in obj)
    if isinstance(obj, torch.Tensor) and obj.ndim >= 2:
        src = rows if obj.shape[0] == n_cap else torch.zeros_like(rows)
        return obj[src[:, None], pos]
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
                  values: torch.Tensor, allowed: torch.Tensor, fn, site: str) -> torch.Tensor:
    """Block ``j`` run on T positions per row (``pos`` [n, T]), ``h1`` [n, T, hidden],
    attending to ``keys``/``values`` [n, H, S, d] and the positions' own new keys where
    ``allowed`` [n, T, S + T] is true; ``fn`` (act -> act) changes the FFN activation
    [n, T, d_ff]. Returns the block output [n, T, hidden]."""
    block = lm.blocks()[j]
    args, kwargs = grp.blocks[j]
    n_cap = grp.ids.shape[0]
    if grp.attn_impl == "sdpa":
        mask = allowed[:, None]  # [n, 1, T, S + T] bool, True = attend
    else:
        neg = torch.finfo(h1.dtype).min
        mask = torch.zeros(allowed.shape, dtype=h1.dtype, device=h1.device).masked_fill(
            ~allowed, neg)[:, None]  # additive
    call = {k: _at_positions(v, rows, pos, n_cap) if k in ("position_embeddings",
                                                           "position_ids") else v
            for k, v in _as_kwargs(block, args, kwargs).items()}
    call.update({grp.cache_arg: _PrefixCache(keys, values), "attention_mask": mask})
    call.pop("cache_position", None)
    _no_extras(call)
    ctx = contextlib.nullcontext() if fn is None else ffn_hooks(lm, {j: fn}, site)
    with ctx:
        out = block(h1, **call)
    return out[0] if isinstance(out, tuple) else out


def _run_causal(lm: LanguageModel, grp: _Group, r_q: torch.Tensor, r_pos: torch.Tensor,
                r_layer: np.ndarray, patch: Patch, site: str) -> torch.Tensor:
    """Like :func:`_run_fast`, for causal LMs, on the rows' positions alone: a change at
    positions p_0 < ... < p_T-1 (consecutive) changes no earlier position, so every block
    runs on those positions, attending to the cached (unchanged) keys/values of positions
    < p_0 and causally among themselves. Hidden states [R, T, hidden]."""
    width, n_t = grp.ids.shape[1], r_pos.shape[1]
    dev = r_pos.device
    # [R, T, S + T]: cached positions before the row's first, the new ones causally
    allowed = torch.cat([
        (torch.arange(width, device=dev)[None, :] < r_pos[:, :1])[:, None, :].expand(
            -1, n_t, -1),
        torch.ones((n_t, n_t), dtype=torch.bool, device=dev).tril()[None].expand(
            len(r_q), -1, -1)], dim=2)
    h = None  # [active rows, T, hidden]
    for j in range(int(r_layer[0]), lm.n_layers):
        start, stop = np.searchsorted(r_layer, [j, j + 1])
        if stop > start:
            new = grp.blocks[j][0][0][r_q[start:stop, None], r_pos[start:stop]]
            h = new if h is None else torch.cat([h, new], dim=0)  # [n, T, hidden]
        n = h.shape[0]
        rows, pos = r_q[:n], r_pos[:n]
        keys, values = grp.kv[j]
        h = _one_position(lm, grp, j, h, rows, pos, keys.index_select(0, rows),
                          values.index_select(0, rows), allowed[:n], patch(j, 0, n, False),
                          site)
    return h  # [R, T, hidden]


def _run_masked(lm: LanguageModel, grp: _Group, r_q: torch.Tensor, r_pos: torch.Tensor,
                r_layer: np.ndarray, patch: Patch, site: str) -> torch.Tensor:
    """Like :func:`_run_fast`, for masked LMs, with two blocks run on the rows' positions
    alone:

    * the entry block l: only the rows' positions' activations change (a row changes the
      activations at its own positions only, in its entry block), and what follows the FFN
      activation in a block is position-wise, so its other positions' outputs are the
      unpatched ones (the captured input of block l + 1); the positions attend to the
      unpatched keys/values of block l;
    * the last block: only the rows' positions' outputs are read, so it runs on them,
      attending to keys/values computed from the (changed) input of all positions.

    Hidden states [R, T, hidden] after the last block at each row's positions."""
    last = lm.n_layers - 1
    real = grp.mask.bool()  # [G, S]
    n_t = r_pos.shape[1]
    no_new = torch.zeros((len(r_q), n_t, n_t), dtype=torch.bool, device=real.device)

    def allowed(rows: torch.Tensor) -> torch.Tensor:  # [n, T, S + T]
        return torch.cat([real[rows][:, None, :].expand(-1, n_t, -1), no_new[: len(rows)]],
                         dim=2)

    h = None  # [active rows, S, hidden]: rows that passed their entry block
    outs = []
    for j in range(int(r_layer[0]), lm.n_layers):
        start, stop = np.searchsorted(r_layer, [j, j + 1])
        if h is not None:
            n = h.shape[0]
            rows = r_q[:n]
            if j < last:
                h = _full_block(lm, grp, j, h, rows, patch(j, 0, n, True), site)
            else:
                keys, values = lm.spec.kv(lm.blocks()[j], h)  # [n, H, S, d]
                pos = r_pos[:n]
                h1 = h[torch.arange(n, device=h.device)[:, None], pos]  # [n, T, hidden]
                outs.append(_one_position(lm, grp, j, h1, rows, pos, keys, values,
                                          allowed(rows), patch(j, 0, n, False), site))
        if stop > start:
            rows, pos = r_q[start:stop], r_pos[start:stop]
            keys, values = grp.kv[j]
            h1 = grp.blocks[j][0][0][rows[:, None], pos]  # [m, T, hidden]
            o = _one_position(lm, grp, j, h1, rows, pos, keys.index_select(0, rows),
                              values.index_select(0, rows), allowed(rows),
                              patch(j, int(start), int(stop), False), site)  # [m, T, hidden]
            if j < last:
                full = grp.blocks[j + 1][0][0].index_select(0, rows)  # [m, S, hidden]
                full = full.index_put((torch.arange(stop - start, device=full.device)[:, None],
                                       pos), o.to(full.dtype))
                h = full if h is None else torch.cat([h, full], dim=0)
            else:
                outs.append(o)
    return torch.cat(outs, dim=0)  # [R, T, hidden]


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


def _runner(lm: LanguageModel, grp: _Group):
    """The fast path a group's rows take: one position (causal), the entry and last block on
    the rows' positions (masked), or every position of the blocks from the row's entry on
    (no cached keys/values: sliding windows shorter than the input, other kernels)."""
    if grp.kv is None:
        return _run_fast
    return _run_causal if lm.arch == "causal" else _run_masked


def _run_rows(lm: LanguageModel, grp: _Group, r_q: torch.Tensor, r_pos: torch.Tensor,
              r_layer: np.ndarray, x: torch.Tensor, site: str) -> torch.Tensor:
    """Attribution rows (one position each, activation set to x[r] in block r_layer[r]):
    hidden states [R, hidden] after the last block (fast paths) or logits [R, V] (the
    fallback, without a registered head)."""
    if lm.spec.head is None:
        return _run_fallback(lm, grp, r_q, r_pos, r_layer, x, site)
    pos = r_pos[:, None]  # [R, 1]
    return _runner(lm, grp)(lm, grp, r_q, pos, r_layer, _entry_patch(r_layer, pos, x),
                            site)[:, 0]


def _target_probs(lm: LanguageModel, hidden: torch.Tensor, targets: torch.Tensor,
                  chunk: int = 128) -> torch.Tensor:
    """P(targets[r, t]) [R, T] from last-block hidden states [R, T, hidden] (float32 softmax
    over the vocabulary, ``chunk`` rows' logits at a time: on the CPU the head's product
    with a 262,144-token vocabulary takes 11 ms per row in chunks of 32, 6 in chunks of
    128)."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        h = hidden[i:i + chunk]
        logits = lm.spec.head(lm.model, h.reshape(-1, h.shape[-1])).float()  # [r T, V]
        probs = torch.softmax(logits, dim=-1)
        out.append(probs.gather(1, targets[i:i + chunk].reshape(-1, 1)).view(h.shape[:2]))
    return torch.cat(out)


def _plan(lm: LanguageModel, queries: Sequence[EncodedQuery]
          ) -> list[tuple[list[int], np.ndarray, np.ndarray, list[list[tuple[int, int]]],
                          dict[int, list[int]]]]:
    """Which queries share what. Queries with the same input and query tokens share the
    capture pass and the AMIG baselines' pass; a causal LM's input that begins another's
    (same query tokens) is read from that one (nothing at a position depends on later
    tokens). Their object tokens at the same position (masked LM: of the same input; causal
    LM: after the same tokens) share a *unit*: its rows (layer, baseline, node) are identical
    up to the target, so they run once, for every target (e.g. a fact's true and wrong
    objects of the same length, or a causal LM's first object token).

    Returns padding groups of at most ``_GROUP`` captured inputs, sorted by length: (the
    queries captured, unit rows, unit positions, per unit its (query, object token id)
    targets, per query of the group the unit of each of its object tokens)."""
    causal = lm.arch == "causal"
    host: dict[int, int] = {}
    covers: dict[tuple, int] = {}
    for i in sorted(range(len(queries)), key=lambda i: -len(queries[i].input_ids)):
        q = queries[i]
        ids, qpos = tuple(q.input_ids), tuple(q.query_positions)
        if (ids, qpos) in covers:
            host[i] = covers[(ids, qpos)]
            continue
        host[i] = i
        for k in (range(1, len(ids) + 1) if causal else (len(ids),)):
            covers.setdefault((ids[:k], qpos), i)
    captured = sorted(set(host.values()), key=lambda i: (len(queries[i].input_ids), i))
    hosted: dict[int, list[int]] = {}
    for i in range(len(queries)):
        hosted.setdefault(host[i], []).append(i)
    groups = []
    for g0 in range(0, len(captured), _GROUP):
        rows = captured[g0:g0 + _GROUP]
        unit_q, unit_pos, targets, members, units = [], [], [], {}, {}
        for g, c in enumerate(rows):
            for i in hosted[c]:
                q = queries[i]
                members[i] = []
                for p, y in zip(q.target_positions, q.target_ids):
                    key = ((tuple(q.input_ids[:p + 1]), tuple(q.query_positions)) if causal
                           else (g, p))
                    if key not in units:
                        units[key] = len(unit_q)
                        unit_q.append(g)
                        unit_pos.append(p)
                        targets.append([])
                    targets[units[key]].append((i, int(y)))
                    members[i].append(units[key])
        groups.append((rows, np.asarray(unit_q, dtype=np.int64),
                       np.asarray(unit_pos, dtype=np.int64), targets, members))
    return groups


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

    Queries that share their input (a fact's candidates: same input ids and query tokens)
    share the capture and baselines' passes, and object tokens read at the same position
    share their rows' forward and the LM head's logits; only the gradients of P(target)
    differ (:func:`_plan`). The scores are those of separate calls up to float rounding.

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
    fast = lm.spec.head is not None

    with _frozen(lm.model):
        for rows_q, unit_q, unit_pos, targets, members in _plan(lm, queries):
            qs = [queries[i] for i in rows_q]
            with record_function("kneurons.capture"):
                grp = _capture(lm, qs, rows_q, unit_q, unit_pos, layers, site)
            n_u = len(grp.unit_q)
            if method == "ig":
                bases = torch.zeros((n_u, n_l, lm.d_ff), device=dev)  # [U, nL, d_ff]
                unit_bases = [[u] for u in range(n_u)]
            else:
                with record_function("kneurons.baselines"):
                    bases, unit_bases = _amig_baselines(lm, qs, grp, layers, site, batch_size)
            local = {i: n for n, i in enumerate(members)}  # the group's queries
            nb = np.asarray([len(unit_bases[u]) for u in range(n_u)])
            n_k = np.asarray([len(t) for t in targets])  # targets per unit
            scores = torch.zeros((len(local) * n_l, lm.d_ff), dtype=torch.float32, device=dev)
            for kk in np.unique(n_k):  # units with kk targets run together
                us = np.nonzero(n_k == kk)[0]
                u_q = np.asarray([[local[i] for i, _ in targets[u]] for u in us])  # [., kk]
                u_y = np.asarray([[y for _, y in targets[u]] for u in us])
                u_nt = np.asarray([[len(queries[i].target_ids) for i, _ in targets[u]]
                                   for u in us])
                at = np.full(n_u, -1)
                at[us] = np.arange(len(us))
                # rows: (unit, layer index, baseline, step), sorted by layer
                rows = [(li, u, b, k) for li in range(n_l) for u in us
                        for b in unit_bases[u] for k in range(steps)]
                r = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
                r_li, r_u, r_b, r_k = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
                r_scale = [torch.as_tensor(1.0 / (nb[r_u] * u_nt[at[r_u], k]),
                                           dtype=torch.float32, device=dev) for k in range(kk)]
                for s0 in range(0, len(r), batch_size):
                    sl = slice(s0, s0 + batch_size)
                    li_t = torch.as_tensor(r_li[sl], device=dev)
                    u_t = torch.as_tensor(r_u[sl], device=dev)
                    a = grp.acts[u_t, li_t]  # [R, d_ff]
                    b = bases[torch.as_tensor(r_b[sl], device=dev), li_t]  # [R, d_ff]
                    k_t = torch.as_tensor(r_k[sl], device=dev)
                    x = (b + alphas_t[k_t, None] * (a - b)).requires_grad_(True)  # [R, d_ff]
                    r_q = torch.as_tensor(grp.unit_q[r_u[sl]], device=dev)
                    r_pos = torch.as_tensor(grp.unit_pos[r_u[sl]], device=dev)
                    tgt = torch.as_tensor(u_y[at[r_u[sl]]], device=dev)  # [R, kk]
                    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                        enabled=autocast):
                        with record_function("kneurons.blocks.forward"):
                            out = _run_rows(lm, grp, r_q, r_pos, layer_arr[r_li[sl]], x, site)
                        with record_function("kneurons.head"):
                            if kk == 1:  # out: hidden states [R, hidden] or logits [R, V]
                                grad_outs = [_head_gradient(lm, out, tgt[:, 0])] if fast \
                                    else None
                            elif fast:
                                grad_outs = _head_gradients(lm, out, tgt)  # [kk, R, hidden]
                            else:
                                grad_outs = _logit_gradients(out, tgt)  # [kk, R, V]
                    with record_function("kneurons.blocks.backward"):
                        if grad_outs is None:
                            grads = torch.autograd.grad(object_prob(out, tgt[:, 0]).sum(), x)
                        else:
                            grads = _backward(out, x, grad_outs)  # kk x [R, d_ff]
                    for k, grad in enumerate(grads):
                        contrib = (a - b) * grad * (weights_t[k_t] * r_scale[k][sl])[:, None]
                        q_k = torch.as_tensor(u_q[at[r_u[sl]], k], device=dev)
                        scores.index_add_(0, q_k * n_l + li_t, contrib)
            scores = scores.view(len(local), n_l, lm.d_ff).cpu().numpy()
            probs = torch.softmax(grp.logits, dim=-1)  # [U, V]
            for qi, units in members.items():
                full = np.zeros((lm.n_layers, lm.d_ff), dtype=np.float32)
                full[layer_arr] = scores[local[qi]]
                u_t = torch.as_tensor(units, device=dev)
                tg = torch.as_tensor(queries[qi].target_ids, device=dev)
                tp = probs[u_t, tg].cpu().numpy().astype(np.float32)
                lg0 = grp.logits[units[0]]
                rank = int((lg0 > lg0[int(queries[qi].target_ids[0])]).sum().item()) + 1
                predicted = bool((grp.logits[u_t].argmax(-1) == tg).all().item())
                results[qi] = Attribution(full, tp, float(tp.mean()), rank, predicted)
    return results  # type: ignore[return-value]


def _backward(out: torch.Tensor, x: torch.Tensor, grad_outs: Sequence[torch.Tensor]
              ) -> list[torch.Tensor]:
    """d <out, grad_outs[k]> / d x for each k: one backward through the rows' graph each
    (the graph is kept until the last)."""
    grads = []
    for k, g in enumerate(grad_outs):
        (grad,) = torch.autograd.grad(out, x, grad_outputs=g.to(out.dtype),
                                      retain_graph=k < len(grad_outs) - 1)
        grads.append(grad)
    return grads


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


def _softmax_off_targets(z: torch.Tensor, targets: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From logits z [R, V] (float32) and targets [R, K]: P(targets) [R, K] (as
    :class:`_ObjectProb` computes it), the softmax with the targets' columns set to 0 [R, V],
    and its row sums [R, 1] (the probability of every other token, without the cancellation
    of 1 - P)."""
    c = _ObjectProb.CHUNK
    lse = torch.cat([torch.logsumexp(z[i:i + c], dim=-1, keepdim=True)
                     for i in range(0, z.shape[0], c)])  # [R, 1]
    p = (z.gather(1, targets) - lse).exp_()  # [R, K]
    s = torch.empty_like(z)
    for i in range(0, z.shape[0], c):
        torch.sub(z[i:i + c], lse[i:i + c], out=s[i:i + c]).exp_()
    s.scatter_(1, targets, 0.0)
    return p, s, s.sum(dim=1, keepdim=True)


def _coefficients(p: torch.Tensor, rest: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """C [R, K, K] with dP_k/dh = P_k (sum_j C_kj dz_{y_j}/dh - J^T s~) (see
    :func:`_head_gradients`): C_kk = 1 - P_k written as the sum of the other tokens'
    probabilities, C_kj = -P_j for the other targets j (each distinct token once; a repeated
    target is the same token, already in C_kk)."""
    n_k = targets.shape[1]
    same = targets[:, :, None] == targets[:, None, :]  # [R, K, K]
    earlier = torch.ones((n_k, n_k), dtype=torch.bool, device=p.device).tril(-1)
    first = ~(same & earlier).any(dim=2)  # [R, K]: y_j's first occurrence
    pj = (p * first)[:, None, :] * (~same)  # [R, K, K]: P_j of the other distinct tokens
    eye = torch.eye(n_k, dtype=p.dtype, device=p.device)
    return -pj + eye * (rest[:, :, None] + pj.sum(dim=2, keepdim=True))


@contextlib.contextmanager
def _output_columns(lm: LanguageModel, cols: torch.Tensor) -> Iterator[bool]:
    """While active, the output embeddings compute only column ``cols[n]`` of input row n:
    [N, 1] instead of [N, V] (its forward stands in for the module's; restored in
    ``finally``). Yields False (and changes nothing) when they are not a linear map."""
    emb = lm.model.get_output_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is None or weight.dim() != 2:
        yield False
        return
    bias = getattr(emb, "bias", None)

    def restricted(u: torch.Tensor) -> torch.Tensor:  # u [N, hidden] -> [N, 1]
        w = weight.index_select(0, cols).to(u.dtype)  # [N, hidden]
        out = (u * w).sum(dim=-1, keepdim=True)
        return out if bias is None else out + bias.index_select(0, cols)[:, None].to(u.dtype)

    had = "forward" in emb.__dict__
    old = emb.__dict__.get("forward")
    emb.forward = restricted
    try:
        yield True
    finally:
        if had:
            emb.forward = old
        else:
            del emb.forward


def _target_logit_gradients(lm: LanguageModel, hidden: torch.Tensor, targets: torch.Tensor,
                            expected: torch.Tensor) -> torch.Tensor | None:
    """d z_{targets[r, k]} / d hidden[r] [K, R, hidden], the gradient of one logit per row and
    target, through the head with the output embeddings restricted to that column (a row of
    the embedding matrix instead of all V). None where that head does not reproduce the full
    head's logits ``expected`` [R, K] (a head whose last step after the output embeddings is
    not element-wise), so that the caller falls back to the dense products."""
    n_r, n_k = targets.shape
    cols = targets.t().reshape(-1)  # [K R], target-major
    leaf = hidden.detach().repeat(n_k, 1).requires_grad_(True)  # [K R, hidden]
    try:
        with _output_columns(lm, cols) as ok, torch.enable_grad():
            z = lm.spec.head(lm.model, leaf) if ok else None
    except (RuntimeError, ValueError, IndexError):  # the head cannot take one column per row
        return None
    if z is None or tuple(z.shape) != (n_k * n_r, 1):
        return None
    got = z.detach().float().view(n_k, n_r).t()
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * (1 + float(expected.abs().max()))):
        return None
    (grad,) = torch.autograd.grad(z.sum(), leaf)
    return grad.view(n_k, n_r, -1)


def _head_gradients(lm: LanguageModel, hidden: torch.Tensor, targets: torch.Tensor
                    ) -> torch.Tensor:
    """d P(targets[r, k] | hidden[r]) / d hidden[r] [K, R, hidden] for K targets per row,
    with the vocabulary-sized products of one target (:func:`_head_gradient`).

    With z = head(h), s = softmax(z), P_k = s_{y_k} and J = dz/dh:
    dP_k/dh = P_k (dz_{y_k}/dh - J^T s). J^T s~, with s~ = s less the rows' targets, is one
    backward through the head for all targets; dz_y/dh for a single logit needs one row of
    the output embeddings (:func:`_target_logit_gradients`), and what the targets took out
    of s~ comes back with their own gradients (:func:`_coefficients`). Where the head's
    logits cannot be restricted to columns, each target takes a dense backward."""
    leaf = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        z = lm.spec.head(lm.model, leaf)  # [R, V]
    with torch.no_grad():
        zf = z.detach().float()
        p, s, rest = _softmax_off_targets(zf, targets)  # [R, K], [R, V], [R, 1]
        expected = zf.gather(1, targets)
    dz = _target_logit_gradients(lm, hidden, targets, expected)
    if dz is None:  # dense: P_k (e_{y_k} - s) through the head for each target
        s.scatter_(1, targets, p)
        outs = []
        for k in range(targets.shape[1]):
            g = -p[:, k:k + 1] * s
            g.scatter_add_(1, targets[:, k:k + 1], p[:, k:k + 1])
            (grad,) = torch.autograd.grad(z, leaf, grad_outputs=g.to(z.dtype),
                                          retain_graph=k < targets.shape[1] - 1)
            outs.append(grad)
        return torch.stack(outs)
    (off,) = torch.autograd.grad(z, leaf, grad_outputs=s.to(z.dtype))  # J^T s~ [R, hidden]
    del s
    coef = _coefficients(p, rest, targets)  # [R, K, K]
    mixed = torch.einsum("rkj,jrh->krh", coef, dz.float()) - off.float()[None]
    return (p.t()[:, :, None] * mixed).to(hidden.dtype)  # [K, R, hidden]


def _logit_gradients(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """dP(targets[r, k]) / d logits[r] = P_k (e_{y_k} - softmax) [K, R, V] (the fallback
    path, whose rows end in logits)."""
    z = logits.detach().float()
    s = torch.softmax(z, dim=-1)  # [R, V]
    p = s.gather(1, targets)  # [R, K]
    outs = []
    for k in range(targets.shape[1]):
        g = -p[:, k:k + 1] * s
        outs.append(g.scatter_add(1, targets[:, k:k + 1], p[:, k:k + 1]))
    return torch.stack(outs)


class ErasedRows:
    """Rows that erase neurons (activation 0) at the object positions of fixed queries, on
    the engine: the engine behind :class:`kneurons.scoring.Erasure` (DKN detection's
    suppressions).

    The queries are captured once (padding groups of queries with the same number of object
    tokens), with the inputs of every block from ``lowest_layer`` on; each call of
    :meth:`probs` then runs its rows (query, set of neurons) as attribution rows run: from the
    cached input of the block of the set's lowest layer (>= ``lowest_layer``), on the
    object positions alone where that is exact (causal LM: every block against the cached
    keys/values, the object positions being consecutive; masked LM: that block and the
    last), the neurons of each later layer erased as the row reaches its block. Rows of
    several queries and layers share a batch."""

    def __init__(self, lm: LanguageModel, queries: Sequence[EncodedQuery],
                 lowest_layer: int = 0) -> None:
        if lm.spec.head is None:
            raise ValueError("erasing rows need a registered head (kneurons.models)")
        if not 0 <= lowest_layer < lm.n_layers:
            raise ValueError(f"lowest_layer must be within 0..{lm.n_layers - 1}")
        self.lm, self.queries, self.lowest = lm, list(queries), int(lowest_layer)
        self.groups = []  # (query indices, group, runner, unpatched last hidden [G, T, h])
        by_t: dict[int, list[int]] = {}
        for i, q in enumerate(self.queries):
            by_t.setdefault(len(q.target_ids), []).append(i)
        layers = list(range(self.lowest, lm.n_layers))
        for n_t, members in by_t.items():
            members.sort(key=lambda i: (len(self.queries[i].input_ids), i))
            for g0 in range(0, len(members), _GROUP):
                qids = members[g0:g0 + _GROUP]
                qs = [self.queries[i] for i in qids]
                unit_q, unit_pos = _units_of(qs)
                with torch.inference_mode():
                    grp = _capture(lm, qs, qids, unit_q, unit_pos, layers, "post",
                                   logits=False)
                run = _runner(lm, grp)
                if run is _run_causal and not all(  # one-position rows need consecutive
                        np.all(np.diff(q.target_positions) == 1) for q in qs):  # positions
                    run = _run_fast
                # the unpatched rows: the last block's output at the object positions
                self.groups.append((qids, grp, run, grp.last.view(len(qs), n_t, -1)))

    def probs(self, neuron_sets: Sequence[Sequence[Sequence[tuple[int, int]]]], *,
              batch_size: int | None = 64) -> list[np.ndarray]:
        """P(object token t) [len(neuron_sets[i]), n_object_tokens] of query i with each of
        its sets of neurons (layer, index) erased (an empty set: the unpatched model);
        ``batch_size`` rows per pass (None: all of a group's)."""
        lm, dev = self.lm, self.lm.device
        if len(neuron_sets) != len(self.queries):
            raise ValueError(f"{len(self.queries)} queries but {len(neuron_sets)} lists of "
                             "neuron sets")
        sets = [[sorted(dict.fromkeys((int(a), int(b)) for a, b in s)) for s in per]
                for per in neuron_sets]
        low = min((s[0][0] for per in sets for s in per if s), default=self.lowest)
        if low < self.lowest:
            raise ValueError(f"layer {low} is below the lowest captured layer {self.lowest}")
        out = [np.zeros((len(s), len(q.target_ids)), dtype=np.float32)
               for q, s in zip(self.queries, sets)]
        for qids, grp, run, last in self.groups:
            rows, plain = [], []  # (entry layer, group row, set index), sorted by entry layer
            for g, i in enumerate(qids):
                for r, s in enumerate(sets[i]):
                    if s:
                        rows.append((s[0][0], g, r))
                    else:
                        plain.append((-1, g, r))
            rows.sort()
            bs = max(len(rows), 1) if batch_size is None else max(1, int(batch_size))
            # the unpatched rows join the first batch's head call (one call fewer)
            for n, chunk in enumerate([rows[s0:s0 + bs] for s0 in range(0, len(rows), bs)]
                                      or [[]]):
                hidden = []  # [R, T, hidden] per part
                with torch.inference_mode():
                    if chunk:
                        r_g = torch.as_tensor([g for _, g, _ in chunk], device=dev)
                        r_pos = torch.as_tensor([self.queries[qids[g]].target_positions
                                                 for _, g, _ in chunk], device=dev)  # [R, T]
                        patch = _zero_patch([sets[qids[g]][r] for _, g, r in chunk], r_pos)
                        hidden.append(run(lm, grp, r_g, r_pos,
                                          np.asarray([e for e, _, _ in chunk]), patch, "post"))
                    if n == 0 and plain:
                        hidden.append(last[torch.as_tensor([g for _, g, _ in plain],
                                                           device=dev)])
                        chunk = chunk + plain
                    if not chunk:
                        continue
                    tgt = torch.as_tensor([self.queries[qids[g]].target_ids
                                           for _, g, _ in chunk], device=dev)  # [R, T]
                    probs = _target_probs(lm, torch.cat(hidden), tgt).cpu().numpy()  # [R, T]
                for (_, g, r), pr in zip(chunk, probs):
                    out[qids[g]][r] = pr
        return out


def probability_gap(lm: LanguageModel, query: EncodedQuery, *, method: str = "amig",
                    layers: Sequence[int] | None = None, site: str = "post") -> np.ndarray:
    """What the scores of each layer must add up to (the completeness property, the
    attribution's convergence check): per layer l, the mean over the object's tokens t of

        P_t(a) - mean over baselines a' of P_t(a'),

    P_t(x) = P(object token t) with layer l's activation at t's position set to x (``ig``:
    the single baseline 0; ``amig``: the query-token baselines). The probabilities are
    measured, not integrated: one unpatched pass, the baselines' pass, and one row per
    (layer, object token, baseline) run as the attribution's rows are (from the cached
    input of block l, on the object position alone where that is exact), all rows batched,
    the LM head once for the rows and the unpatched positions together;
    ``scores[l].sum() - gap[l]`` is the integration error, which falls with ``steps`` (see
    ``benchmarks/attribution.py``).

    Returns [n_layers] float64 (0 where a layer is not in ``layers``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    layers = list(range(lm.n_layers)) if layers is None else sorted(set(layers))
    if method == "amig" and not query.query_positions:
        raise ValueError("AMIG needs at least one query token to replace")
    dev = lm.device
    pos = torch.as_tensor(query.target_positions, device=dev)  # [T]
    unit_q, unit_pos = _units_of([query])
    n_l, n_t = len(layers), len(query.target_ids)
    batch_size = default_batch_size(lm)

    fast = lm.spec.head is not None
    tgt_a = torch.as_tensor(query.target_ids, device=dev)  # [T]
    with torch.inference_mode():
        grp = _capture(lm, [query], [0], unit_q, unit_pos, layers, site, logits=not fast)
        p_a = None if fast else object_token_probs(grp.logits, query.target_ids)  # [T]
        if method == "ig":
            bases = torch.zeros((n_t, n_l, lm.d_ff), device=dev)  # [T, nL, d_ff]
            unit_bases = [[t] for t in range(n_t)]
        else:
            bases, unit_bases = _amig_baselines(lm, [query], grp, layers, site, batch_size)
        # rows: (layer index, object token, baseline), sorted by layer
        r = np.asarray([(li, t, b) for li in range(n_l) for t in range(n_t)
                        for b in unit_bases[t]], dtype=np.int64)
        p_rows = torch.empty(len(r), dtype=torch.float32, device=dev)
        for s0 in range(0, len(r), batch_size):
            sl = slice(s0, s0 + batch_size)
            r_li, r_t = r[sl, 0], torch.as_tensor(r[sl, 1], device=dev)
            x = bases[torch.as_tensor(r[sl, 2], device=dev),
                      torch.as_tensor(r_li, device=dev)]  # [R, d_ff]
            out = _run_rows(lm, grp, torch.zeros_like(r_t), pos[r_t], np.asarray(layers)[r_li],
                            x, site)  # hidden states [R, hidden] (fast) or logits [R, V]
            tgt = tgt_a[r_t]  # [R]
            if not fast:
                p_rows[sl] = torch.softmax(out.float(), dim=-1).gather(1, tgt[:, None])[:, 0]
            elif p_a is None:  # the unpatched P(a) joins the first rows' head call
                p = _target_probs(lm, torch.cat([grp.last, out])[:, None],
                                  torch.cat([tgt_a, tgt])[:, None])[:, 0]
                p_a, p_rows[sl] = p[:n_t], p[n_t:]
            else:
                p_rows[sl] = _target_probs(lm, out[:, None], tgt[:, None])[:, 0]
        gap = np.zeros(lm.n_layers)
        for li, layer in enumerate(layers):
            total = 0.0
            rows_l = r[:, 0] == li
            for t in range(len(pos)):
                p_b = p_rows[torch.as_tensor(np.nonzero(rows_l & (r[:, 1] == t))[0], device=dev)]
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
