"""The LIKN report: statistics and the cross-lingual erasing and editing table (CSV,
Markdown) of every model with several languages, and their figures (:mod:`kneurons.figures`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .figures import figure, layer_bars
from .io import write_csv, write_text


def _percent(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{100 * float(value):.2f}"


LIKN_FIGURES = ("likn_layers", "likn_erase", "likn_edit")
KIND_LABELS = {"fact": "same fact (LIKN)", "control_random": "control: random other fact",
               "control_same_relation": "control: other fact, same relation"}
"""How the rows of :func:`kneurons.likn.likn_statistics` are named in the report."""


def _prob(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):.3f}"


def _signed_percent(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{100 * float(value):+.1f}"


def _main_group(languages: pd.Series) -> str:
    """The language group with the most languages (ties: the first in string order)."""
    groups = sorted(set(languages))
    return max(groups, key=lambda g: (g.count("+"), [-ord(c) for c in g])) if groups else ""


def likn_markdown(stats: pd.DataFrame, edits: pd.DataFrame) -> str:
    """The LIKN statistics (with their controls), per relation, and the erasing and editing
    tables as Markdown. ``stats``/``edits``: :func:`kneurons.likn.likn_statistics` and
    :func:`kneurons.likn.edit_summary` rows with a leading ``model`` column."""
    out = ["# Language-independent knowledge neurons (LIKN) and cross-lingual editing", "",
           "## LIKN of the discovery facts (all relations)", "",
           "| Model | Languages | Pairs | Facts | With LIKN (%) | Mean LIKN | Mean KN "
           "| LIKN share of KN (%) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    overall = stats[stats["relation"] == "all"]
    for row in overall.itertuples(index=False):
        out.append(f"| {row.model} | {row.languages} | {KIND_LABELS.get(row.kind, row.kind)} | "
                   f"{int(row.n_facts)} | {_percent(row.share_with_likn)} | "
                   f"{row.mean_likn:.2f} | {row.mean_kn:.2f} | "
                   f"{_percent(row.likn_share_of_kn)} |")
    if overall.empty:
        out.append("| (no data) | | | | | | | |")
    out += ["", "LIKN of a fact: the intersection of its knowledge neurons (KN) in the group's "
            "languages. Controls: the same intersection between a fact's KN in the first "
            "language and another fact's KN in the others (a random other fact, or another "
            "fact of the same relation), i.e. the overlap that chance and shared "
            "relation/object neurons alone give. LIKN share of KN: mean over the languages "
            "of |LIKN| / |KN|.", "",
            "## Per relation: facts with a non-empty LIKN (%)", "",
            "| Model | Languages | Relation | Facts | " + " | ".join(KIND_LABELS.values())
            + " | Mean LIKN (same fact) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    per_relation = stats[stats["relation"] != "all"]
    for (model, languages, relation), group in per_relation.groupby(
            ["model", "languages", "relation"], sort=True):
        by_kind = group.set_index("kind")
        cells = [_percent(by_kind["share_with_likn"].get(kind)) for kind in KIND_LABELS]
        facts = by_kind["n_facts"].get("fact")
        mean = by_kind["mean_likn"].get("fact")
        out.append(f"| {model} | {languages} | {relation} | "
                   f"{'n/a' if facts is None else int(facts)} | " + " | ".join(cells)
                   + f" | {'n/a' if mean is None else f'{mean:.2f}'} |")
    out += ["", "## Erasing: activations of the set set to 0 at the object position(s)", "",
            "| Model | Neuron set | Neurons | Scored in | Facts | P(true) before | after | "
            "Change (%) | Top-1 before (%) | after (%) | Unrelated: change (%) | "
            "Unrelated top-1 after (%) |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    erase = edits[edits["operation"] == "erase"]
    for row, unrelated in _with_unrelated(erase):
        out.append(
            f"| {row.model} | {row.neuron_set} | {row.mean_neurons:.2f} | {row.eval_lang} | "
            f"{int(row.n)} | {_prob(row.p_true_before)} | {_prob(row.p_true_after)} | "
            f"{_signed_percent(row.rel_change_p_true)} | {_percent(row.top1_true_before)} | "
            f"{_percent(row.top1_true_after)} | {_signed_percent(unrelated.get('rel_change_p_true'))} | "
            f"{_percent(unrelated.get('top1_true_after'))} |")
    out += ["", "## Editing: value slots v_i <- v_i - λ1 e(true) + λ2 e(wrong) (Dai et al.)", "",
            "| Model | Edited in | Neuron set | Scored in | Success (%) | P(wrong) before | "
            "after | P(true) before | after | Top-1 true after (%) | Unrelated: change (%) | "
            "Unrelated top-1 after (%) |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    edit = edits[edits["operation"] == "edit"]
    for row, unrelated in _with_unrelated(edit):
        out.append(
            f"| {row.model} | {row.edit_lang} | {row.neuron_set} | {row.eval_lang} | "
            f"{_percent(row.edit_success)} | {_prob(row.p_wrong_before)} | "
            f"{_prob(row.p_wrong_after)} | {_prob(row.p_true_before)} | "
            f"{_prob(row.p_true_after)} | {_percent(row.top1_true_after)} | "
            f"{_signed_percent(unrelated.get('rel_change_p_true'))} | "
            f"{_percent(unrelated.get('top1_true_after'))} |")
    out += ["", "Sets of equal size k = |LIKN| per fact: likn (the fact's LIKN over all the "
            "model's languages), likn_other (the k best LIKN neurons of another fact, "
            "seeded; facts without such a fact are left out of this set), only_<lang> (the k "
            "best KN of that language that are in no "
            "other language's KN), random (per LIKN neuron a random neuron of the same layer "
            "outside every KN of the fact). Change: mean relative change of P(true) "
            "((after - before) / before). P(object): mean over the object's tokens (teacher "
            "forced). Top-1: every object token is the model's argmax. Success: the wrong "
            "object becomes top-1. e(y): the output word embedding of the object (mean over its "
            "tokens in the edited language). Unrelated: the true objects of discovery facts of "
            "other relations, scored under the same intervention (the locality control)."]
    return "\n".join(out) + "\n"


def _with_unrelated(summary: pd.DataFrame):
    """(fact row, the matching unrelated row as a dict) pairs of an edit summary."""
    keys = ["model", "operation", "neuron_set", "edit_lang", "eval_lang"]
    unrelated = {tuple(row[k] for k in keys): row
                 for row in summary[summary["target"] == "unrelated"].to_dict("records")}
    for row in summary[summary["target"] == "fact"].itertuples(index=False):
        yield row, unrelated.get(tuple(getattr(row, k) for k in keys), {})


def plot_likn_layers(layers: pd.DataFrame, out_png, out_svg) -> None:
    """LIKN neurons per layer, of the facts and of the two controls: one panel per model
    (its language group with the most languages). Columns: model, languages, kind, layer,
    n_likn."""
    title = "Language-independent knowledge neurons per layer"
    models = sorted(layers["model"].unique()) if len(layers) else []
    with figure(out_png, out_svg, len(models), 5.0, 3.6,
                title=title, empty=not models) as (fig, axes):
        for ax, model in zip(axes, models):
            sub = layers[layers["model"] == model]
            group = _main_group(sub["languages"])
            sub = sub[sub["languages"] == group]
            bars = {KIND_LABELS[kind]: sub[sub["kind"] == kind]
                    .groupby("layer")["n_likn"].sum()
                    for kind in KIND_LABELS if kind in set(sub["kind"])}
            layer_bars(ax, bars, "neurons (summed over facts)", f"{model} ({group})",
                        fontsize="small")


def _set_order(names) -> list[str]:
    rank = {"likn": 0, "likn_other": 1, "random": 3}
    return sorted(set(names), key=lambda n: (rank.get(n, 2), n))


def _grouped_bars(ax, data: pd.DataFrame, x_keys: list, value: str, scale: float = 100.0):
    """Bars of ``value`` per x key (tuple label) and evaluation language."""
    languages = sorted(data["eval_lang"].unique())
    width = 0.8 / max(len(languages), 1)
    positions = np.arange(len(x_keys))
    for j, lang in enumerate(languages):
        sub = data[data["eval_lang"] == lang].set_index("_x")[value].reindex(x_keys)
        ax.bar(positions + (j - (len(languages) - 1) / 2) * width,
               scale * sub.to_numpy(np.float64), width=width, label=f"scored in {lang}")
    ax.set_xticks(positions)
    ax.set_xticklabels(x_keys, rotation=30, ha="right")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.legend(fontsize="small")


def plot_likn_erase(edits: pd.DataFrame, out_png, out_svg) -> None:
    """Relative change of P(true) of the erased facts per neuron set and scoring language:
    one panel per model. ``edits``: edit summaries with a ``model`` column."""
    title = "Erasing a fact through its neurons: change of P(true object)"
    data = edits[(edits["operation"] == "erase") & (edits["target"] == "fact")] \
        if len(edits) else edits
    models = sorted(data["model"].unique()) if len(data) else []
    with figure(out_png, out_svg, len(models), 5.0, 3.8,
                title=title, empty=not models) as (fig, axes):
        for ax, model in zip(axes, models):
            sub = data[data["model"] == model].assign(_x=lambda d: d["neuron_set"])
            _grouped_bars(ax, sub, _set_order(sub["neuron_set"]), "rel_change_p_true")
            ax.set_ylabel("relative change of P(true) (%)")
            ax.set_title(model)


def plot_likn_edit(edits: pd.DataFrame, out_png, out_svg) -> None:
    """Editing a fact to its wrong object: success (top row) and relative change of P(true)
    (bottom row) per (edited language, neuron set) and scoring language, one column per
    model."""
    title = "Editing a fact through its neurons (Dai et al. value-slot edit)"
    data = edits[(edits["operation"] == "edit") & (edits["target"] == "fact")] \
        if len(edits) else edits
    models = sorted(data["model"].unique()) if len(data) else []
    ncols = max(len(models), 1)
    with figure(out_png, out_svg, ncols, 6.0, 7.0, nrows=2,
                title=title, empty=not models) as (fig, grid):
        for col, model in enumerate(models):
            sub = data[data["model"] == model].assign(
                _x=lambda d: d["edit_lang"] + ": " + d["neuron_set"])
            keys = [f"{lang}: {name}" for lang in sorted(sub["edit_lang"].unique())
                    for name in _set_order(sub["neuron_set"])]
            _grouped_bars(grid[0][col], sub, keys, "edit_success")
            grid[0][col].set_ylabel("wrong object top-1 (%)")
            grid[0][col].set_ylim(0, 100)
            grid[0][col].set_title(f"{model}: edit success")
            _grouped_bars(grid[1][col], sub, keys, "rel_change_p_true")
            grid[1][col].set_ylabel("relative change of P(true) (%)")
            grid[1][col].set_xlabel("edited in: neuron set")
            grid[1][col].set_title(f"{model}: P(true object)")


def likn_report(runs: Sequence[Mapping], out_csv, out_edit_csv, out_md,
                figures: Mapping[str, tuple]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The LIKN statistics (CSV), the editing summary (CSV), both as Markdown, and the
    figures of LIKN_FIGURES, from each model's ``{"model", "stats", "layers", "edits"}``
    (:mod:`kneurons.likn` tables; ``edits`` is an edit summary). Returns the two tables."""
    def stack(key: str) -> pd.DataFrame:
        frames = [run[key].assign(model=run["model"]) for run in runs]
        if not frames:
            return pd.DataFrame(columns=["model"])
        table = pd.concat(frames, ignore_index=True)
        return table[["model"] + [c for c in table.columns if c != "model"]]

    stats, layers, edits = stack("stats"), stack("layers"), stack("edits")
    write_csv(stats, out_csv)
    write_csv(edits, out_edit_csv)
    write_text(likn_markdown(stats, edits), out_md)
    plot_likn_layers(layers, *figures["likn_layers"])
    plot_likn_erase(edits, *figures["likn_erase"])
    plot_likn_edit(edits, *figures["likn_edit"])
    return stats, edits
