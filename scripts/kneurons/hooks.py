"""Scoped hooks on FFN neurons, addressed by layer index through the architecture registry.

Every context manager here removes all of its hook handles in ``finally``, also when the body
raises. Two activation sites exist per layer:

* ``"post"`` (default, the knowledge neurons): the input of the FFN output projection
  ([batch, seq, d_ff], after the nonlinearity), reached with a forward *pre*-hook;
* ``"pre"``: the output of the FFN input projection (before the nonlinearity), reached with a
  forward hook; not defined for gated FFNs.

Activation *patches* (:class:`FFNPatch`, :func:`patch_ffn`) are applied functionally
(``index_put`` on a copy), so gradients flow through the new values and the model's own tensors
are never modified in place. (An *edit*, in kneurons, changes weights: the LIKN edit,
:func:`kneurons.likn.edit_value_slots`.) Scoring an object under a patch is
:mod:`kneurons.scoring`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from .models import LanguageModel

Site = Literal["post", "pre"]
SITES: tuple[str, ...] = ("post", "pre")
# fn(act [batch, seq, d_ff]) -> new act [batch, seq, d_ff]
ActFn = Callable[[torch.Tensor], torch.Tensor]


def site_module(lm: LanguageModel, layer: int, site: str = "post") -> nn.Module:
    """The module hooked for ``layer`` at ``site`` (see module docstring)."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    if not 0 <= layer < lm.n_layers:
        raise IndexError(f"layer {layer} outside 0..{lm.n_layers - 1}")
    block = lm.blocks()[layer]
    if site == "post":
        return lm.spec.ffn_site(block)
    if lm.spec.ffn_in is None:
        raise ValueError(f"site='pre' is not defined for {lm.spec.model_type!r} (gated FFN)")
    return lm.spec.ffn_in(block)


def _register(module: nn.Module, fn: ActFn, site: str) -> torch.utils.hooks.RemovableHandle:
    if site == "post":
        def pre_hook(mod, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))  # the projection's only tensor input, passed by name
            return args, {**kwargs, key: fn(kwargs[key])}
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def fwd_hook(mod, args, output):
        return fn(output)
    return module.register_forward_hook(fwd_hook)


@contextlib.contextmanager
def ffn_hooks(lm: LanguageModel, fns: Mapping[int, ActFn], site: str = "post") -> Iterator[None]:
    """Apply ``fns[layer](act) -> act`` to the FFN activation of each given layer."""
    handles = []
    try:
        for layer, fn in fns.items():
            handles.append(_register(site_module(lm, layer, site), fn, site))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_ffn(lm: LanguageModel, layers: Sequence[int] | None = None,
                site: str = "post") -> Iterator[dict[int, torch.Tensor]]:
    """Record the FFN activation of ``layers`` (default: all) during the forward passes run in
    the body. Yields a dict filled as the model runs: layer -> detached act [batch, seq, d_ff]
    (the last forward pass wins)."""
    layers = range(lm.n_layers) if layers is None else layers
    acts: dict[int, torch.Tensor] = {}

    def reader(layer: int) -> ActFn:
        def fn(act: torch.Tensor) -> torch.Tensor:
            acts[layer] = act.detach()
            return act
        return fn

    with ffn_hooks(lm, {layer: reader(layer) for layer in layers}, site):
        yield acts


@dataclass(frozen=True)
class FFNPatch:
    """Change the activation of ``neurons`` of ``layer`` at ``positions``.

    ``op``: ``"zero"`` (set to 0), ``"scale"`` (multiply by ``value``), ``"set"`` (set to
    ``value``). ``positions=None``: every position. ``rows=None``: every sample of the batch,
    otherwise only those batch rows (per-sample patches in one batched forward).
    """

    layer: int
    neurons: Sequence[int]
    positions: Sequence[int] | None = None
    op: Literal["zero", "scale", "set"] = "zero"
    value: float = 0.0
    rows: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.op not in ("zero", "scale", "set"):
            raise ValueError(f"op must be zero, scale or set, got {self.op!r}")


def _apply_patches(act: torch.Tensor, patches: Sequence[FFNPatch]) -> torch.Tensor:
    # act: [batch, seq, d_ff]
    b, s, _ = act.shape
    out = act
    for e in patches:
        rows = torch.arange(b, device=act.device) if e.rows is None else \
            torch.as_tensor(list(e.rows), dtype=torch.long, device=act.device)
        pos = torch.arange(s, device=act.device) if e.positions is None else \
            torch.as_tensor(list(e.positions), dtype=torch.long, device=act.device)
        neu = torch.as_tensor(list(e.neurons), dtype=torch.long, device=act.device)
        if rows.numel() == 0 or pos.numel() == 0 or neu.numel() == 0:
            continue
        idx = (rows[:, None, None], pos[None, :, None], neu[None, None, :])  # broadcast grid
        cur = out[idx]  # [rows, pos, neurons]
        if e.op == "zero":
            new = torch.zeros_like(cur)
        elif e.op == "scale":
            new = cur * e.value
        else:
            new = torch.full_like(cur, e.value)
        out = out.index_put(idx, new)
    return out


@contextlib.contextmanager
def patch_ffn(lm: LanguageModel, patches: Sequence[FFNPatch], site: str = "post"
              ) -> Iterator[None]:
    """Apply ``patches`` to every forward pass run in the body."""
    by_layer: dict[int, list[FFNPatch]] = {}
    for e in patches:
        by_layer.setdefault(e.layer, []).append(e)

    def patcher(es: list[FFNPatch]) -> ActFn:
        return lambda act: _apply_patches(act, es)

    fns = {layer: patcher(es) for layer, es in by_layer.items()}
    with ffn_hooks(lm, fns, site):
        yield


@contextlib.contextmanager
def capture_block_inputs(lm: LanguageModel, layers: Sequence[int]
                         ) -> Iterator[dict[int, tuple[tuple, dict]]]:
    """Record the exact ``(args, kwargs)`` each block of ``layers`` is called with (hidden
    states [batch, seq, hidden] first, then the attention mask, rotary embeddings... in the
    model's own format), so a block can later be re-run from its cached input."""
    calls: dict[int, tuple[tuple, dict]] = {}
    blocks = lm.blocks()
    handles = []

    def recorder(layer: int):
        def hook(mod, args, kwargs):
            calls[layer] = (tuple(args), dict(kwargs))  # args[0]: [batch, seq, hidden]
        return hook

    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_pre_hook(recorder(layer),
                                                                   with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()
