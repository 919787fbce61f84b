"""Command line: ``kneurons attribute ...`` (attribution of single prompts or a JSONL file).

Examples::

    kneurons attribute --model bert-base-cased --arch masked \\
        --prompt "The capital of Tanzania is [MASK] ." --target Dodoma --out scores.npy
    kneurons attribute --model gpt2 --arch causal --queries facts.jsonl --out scores/

With ``--queries`` each line is ``{"prompt": ..., "target": ...}``; ``--out`` is then a folder
receiving ``{i}.npy`` per line (0-based line index) and ``timings.json``
(``{"seconds": [...]}``: attribution time per query, model loading excluded). Error messages
name lines 1-based, as editors do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np


class InputError(Exception):
    """A user input (e.g. a JSONL line) is invalid; the message says where."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kneurons", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attribute", help="attribution scores of FFN neurons for a fact",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--model", required=True, help="hub id or local folder")
    a.add_argument("--arch", required=True, choices=["masked", "causal"])
    a.add_argument("--revision", default=None, help="hub revision (commit, tag or branch)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt with the object slot marked by --marker")
    src.add_argument("--queries", type=Path, help="JSONL file, one {prompt, target} per line")
    a.add_argument("--target", help="the object (with --prompt)")
    a.add_argument("--marker", default="[MASK]", help="object slot marker in prompts")
    a.add_argument("--method", default="amig", choices=["amig", "ig"])
    a.add_argument("--steps", type=int, default=20)
    a.add_argument("--quadrature", default="riemann",
                   choices=["riemann", "gauss-legendre", "linspace"])
    a.add_argument("--site", default="post", choices=["post", "pre"],
                   help="FFN activation after (post) or before (pre) the nonlinearity")
    a.add_argument("--batch-size", type=int, default=None,
                   help="interpolation rows per pass (default: 64 on the CPU, 512 on a GPU)")
    a.add_argument("--autocast", action="store_true",
                   help="bf16 autocast for the gradient passes (a GPU option; scores change "
                        "in the third digit)")
    a.add_argument("--out", type=Path, default=None,
                   help=".npy file (--prompt) or folder (--queries)")
    a.add_argument("--top", type=int, default=10, help="neurons printed per query")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    return p


def read_queries(path: Path, marker: str) -> list[tuple[str, str]]:
    """Read and validate a JSONL file of {"prompt", "target"} objects."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    out = []
    for n, line in enumerate(lines, start=1):
        where = f"{path}: line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object with 'prompt' and 'target'")
        for field in ("prompt", "target"):
            if field not in obj:
                raise InputError(f"{where}: field '{field}' is missing")
            if not isinstance(obj[field], str) or not obj[field].strip():
                raise InputError(f"{where}: field '{field}' must be a non-empty string")
        if obj["prompt"].count(marker) != 1:
            raise InputError(f"{where}: field 'prompt' must contain the marker {marker!r} once")
        out.append((obj["prompt"], obj["target"]))
    if not out:
        raise InputError(f"{path}: no queries")
    return out


def _report(i: int | None, res, top: int, n_layers: int) -> None:
    from .neurons import knowledge_neurons

    head = "" if i is None else f"[{i}] "
    print(f"{head}P(target) = {res.prob:.6g} (per-token mean; tokens: "
          f"{', '.join(f'{p:.4g}' for p in res.token_probs)}), rank {res.rank}, "
          f"predicted {res.predicted}")
    print(f"{head}layer\tneuron\tscore")
    for layer, neuron, score in knowledge_neurons(res.scores, -np.inf, top):
        print(f"{head}{layer}\t{neuron}\t{score:.6g}")


def _attribute(args: argparse.Namespace) -> None:
    from .attribution import attribute
    from .io import write_json, write_npy
    from .models import load_model
    from .queries import encode_prompt

    if args.prompt is not None:
        if args.target is None:
            raise InputError("--target is required with --prompt")
        if args.prompt.count(args.marker) != 1:
            raise InputError(f"--prompt must contain the marker {args.marker!r} once")
        items = [(args.prompt, args.target)]
    else:
        if args.target is not None:
            raise InputError("--target goes with --prompt; put targets in the JSONL file")
        items = read_queries(args.queries, args.marker)
    if args.steps < 1:
        raise InputError("--steps must be >= 1")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, args.arch, revision=args.revision, device=args.device)
    encoded = []
    for i, (prompt, target) in enumerate(items):
        try:
            encoded.append(encode_prompt(lm, prompt, target, marker=args.marker))
        except ValueError as e:
            where = f"{args.queries}: line {i + 1}: " if args.queries else ""
            raise InputError(f"{where}{e}") from None

    opts = dict(method=args.method, steps=args.steps, quadrature=args.quadrature,
                batch_size=args.batch_size, site=args.site, autocast=args.autocast)
    if args.queries is None:
        (res,) = attribute(lm, encoded, **opts)
        _report(None, res, args.top, lm.n_layers)
        if args.out is not None:
            write_npy(res.scores.astype(np.float32), args.out)
        return
    seconds = []
    for i, q in enumerate(encoded):
        t0 = time.perf_counter()
        (res,) = attribute(lm, [q], **opts)
        seconds.append(time.perf_counter() - t0)
        _report(i, res, args.top, lm.n_layers)
        if args.out is not None:
            write_npy(res.scores.astype(np.float32), args.out / f"{i}.npy")
    if args.out is not None:
        write_json({"seconds": seconds}, args.out / "timings.json")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "attribute":
            _attribute(args)
    except InputError as e:
        parser.exit(2, f"kneurons: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
