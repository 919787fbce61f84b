# Config validation (the schema and the checks beyond it), wildcard constraints and input
# functions.
import functools
import json
import os
import re
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

# The workflow runs the library of its own checkout, never a kneurons installed elsewhere: the
# `script:` preamble only appends the script folder to sys.path (after site-packages), so the
# folder goes first on this process's sys.path and on the jobs' PYTHONPATH (which Python puts
# ahead of site-packages; jobs inherit this process's environment).
SCRIPTS = str(Path(workflow.basedir) / "scripts")
sys.path.insert(0, SCRIPTS)
_pythonpath = os.environ.get("PYTHONPATH", "").split(os.pathsep)
if _pythonpath[0] != SCRIPTS:
    os.environ.update(PYTHONPATH=os.pathsep.join([SCRIPTS, *filter(None, _pythonpath)]))

from kneurons.config import (
    check_models,
    check_relations,
    check_types,
    coerce_strings,
    schema_error,
)
from kneurons.mlama import relations_in
from kneurons.records import attributed_layers

SCHEMA_PATH = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
coerce_strings(config, SCHEMA)  # nested --config values arrive as strings
if (problem := schema_error(config, SCHEMA)) is not None:
    # one paragraph, not Snakemake's print of the whole schema
    raise ValueError(problem)
validate(config, str(SCHEMA_PATH))  # fills in the schema's defaults
check_types(config, SCHEMA)  # 20.0 is no integer, NaN no number

# Bumped on purpose whenever a stage's results change for the same params, so that Snakemake
# reruns it (the library is not tracked as code by Snakemake).
VERSIONS = {
    "data": 1,
    "toy": 3,  # = kneurons.toy.TOY_VERSION; 3: 30 epochs of 64
    "attribution": 3,  # 2: scores stored as float32; 3: parts, layers, refinement
    "dkn": 3,  # 2: calibration facts excluded; neurons.dkn_count; 3: controls, stability
    "factcheck": 3,  # 3: baselines, controls, intervals, tests, converged records only
    "likn": 3,  # 3: permutation nulls, intervals, paired tests
    "localization": 2,  # 2: deletion curves at equal k, matched controls, gxi, Holm
    "import": 1,  # = kneurons.gguf.IMPORT_VERSION
}

LANGUAGES = list(config["mlama"]["languages"])
MODELS = config["models"]
PARTS = ["discovery", "evaluation"]  # the split's parts
# attribution parts (kneurons.records): the discovery facts' true objects (attribute_shard), and
# the candidates only fact checking reads (attribute_checked)
ATTRIBUTION_PARTS = ["discovery", "evaluation", "calibration"]
CHECKED_PARTS = ["evaluation", "calibration"]
SHARDS = list(range(config["attribution"]["shards"]))


def _check_config():
    for alias, spec in MODELS.items():
        unknown = sorted(set(spec["languages"]) - set(LANGUAGES))
        if unknown:
            raise ValueError(
                f"config: models.{alias}.languages has {unknown}, not in mlama.languages {LANGUAGES}"
            )
    if config["neurons"]["max_kn"] > config["attribution"]["keep_top"]:
        raise ValueError(
            "config: neurons.max_kn must not exceed attribution.keep_top "
            f"({config['neurons']['max_kn']} > {config['attribution']['keep_top']})"
        )
    source = config["mlama"]["source"]
    if is_url(source):
        if not config["mlama"]["sha256"] and mlama_checksums() is None:
            raise ValueError(
                "config: mlama.sha256 is required when mlama.source is a URL and "
                f"mlama.languages {LANGUAGES} are not all covered by {MLAMA_CHECKSUMS}"
            )
    elif not Path(source).exists():
        raise ValueError(f"config: mlama.source {source!r} does not exist")
    elif config["mlama"]["relations"] != "all":
        check_relations(
            config["mlama"]["relations"],
            {lang: relations_in(source, lang) for lang in LANGUAGES},
        )
    toy = config["toy"]
    if any(spec.get("toy") for spec in MODELS.values()):
        if toy["hidden"] % toy["heads"]:
            raise ValueError(
                f"config: toy.hidden ({toy['hidden']}) must be a multiple of toy.heads ({toy['heads']})"
            )
    for alias, spec in MODELS.items():
        hf_id = spec.get("hf_id", "")
        local = Path(hf_id).is_absolute() or hf_id.startswith((".", "~"))
        if local and not Path(hf_id).expanduser().exists():
            raise ValueError(
                f"config: models.{alias}.hf_id {hf_id!r} is a local path that does not exist"
            )
    # unsupported architectures and truncated GGUF files, at plan time
    check_models(MODELS)


MLAMA_CHECKSUMS = Path(workflow.basedir) / "resources" / "mlama1.1-en-zh.sha256"


def mlama_checksums():
    """The shipped SHA-256 list of mLAMA 1.1's en/zh files, where it covers every language of
    the run (a download is then verified file by file), else None."""
    from kneurons.download import covered_languages

    covered = covered_languages(MLAMA_CHECKSUMS)
    return str(MLAMA_CHECKSUMS) if set(LANGUAGES) <= covered else None


def is_url(source):
    return re.match(r"^https?://", str(source)) is not None


_check_config()


wildcard_constraints:
    lang="|".join(re.escape(lang) for lang in LANGUAGES),
    model="|".join(re.escape(alias) for alias in MODELS),
    part="|".join(ATTRIBUTION_PARTS),
    shard=r"\d+",


# ---- data -------------------------------------------------------------------------------


def mlama_input(wildcards):
    """What prepare_mlama reads: the downloaded archive, a local zip, or the language's files."""
    source = config["mlama"]["source"]
    if is_url(source):
        return "results/data/download/mlama1.1.zip"
    path = Path(source)
    if path.suffix == ".zip":
        return str(path)
    for folder in (path / wildcards.lang, path / "mlama1.1" / wildcards.lang):
        if folder.is_dir():
            return sorted(str(p) for p in folder.glob("*.jsonl"))
    raise ValueError(
        f"config: mlama.source {source!r} has no folder {wildcards.lang}/ (nor mlama1.1/{wildcards.lang}/)"
    )


def mlama_source_path():
    source = config["mlama"]["source"]
    return "results/data/download/mlama1.1.zip" if is_url(source) else source


# ---- models -----------------------------------------------------------------------------


def model_input(wildcards):
    """A toy model's trained folder or a GGUF model's imported one; hub models come from the
    hub cache (no input)."""
    spec = MODELS[wildcards.model]
    if spec.get("toy") or spec.get("gguf"):
        return f"results/models/{wildcards.model}/model"
    return []


def model_params(wildcards):
    """The model's identity as plain values: changing it reruns everything that uses it."""
    spec = MODELS[wildcards.model]
    if spec.get("toy"):
        return {
            "source": f"results/models/{wildcards.model}/model",
            "arch": spec["arch"],
            "revision": None,
            "trust_remote_code": False,
            "toy": True,
        }
    if spec.get("gguf"):
        return {
            "source": f"results/models/{wildcards.model}/model",
            "arch": spec["arch"],
            "revision": None,
            "trust_remote_code": False,
            "toy": False,
            "gguf": gguf_source(wildcards.model),
        }
    return {
        "source": spec["hf_id"],
        "arch": spec["arch"],
        "revision": spec.get("revision"),
        "trust_remote_code": spec.get("trust_remote_code", False),
        "toy": False,
        # the weights themselves: a local folder's content digest, a hub id's commit
        "weights": model_weights(spec["hf_id"], spec.get("revision")),
    }


@functools.cache
def model_weights(source, revision):
    """A hub or local model's identity at plan time (kneurons.checkpoint.model_identity), once
    per invocation; local digests are cached under .snakemake/ by file size and mtime.
    """
    from kneurons.checkpoint import model_identity

    return model_identity(
        source, revision, cache=Path(".snakemake") / "kneurons" / "model-digests.json"
    )


def gguf_source(alias):
    """A GGUF model's source as plain values in a fixed key order (sha256 null if not given)."""
    source = MODELS[alias]["gguf"]
    return {key: source.get(key) for key in ("file", "package", "sha256", "version")}


def model_aliases(kind):
    """Regex of the aliases of one kind ("toy" or "gguf"): the model wildcard of the rule
    that makes their folder (never matches when there are none)."""
    aliases = [alias for alias, spec in MODELS.items() if spec.get(kind)]
    return "|".join(re.escape(alias) for alias in aliases) or "(?!)"


def model_languages(alias):
    """The model's languages, in mlama.languages order."""
    return [lang for lang in LANGUAGES if lang in MODELS[alias]["languages"]]


def toy_model_languages(wildcards):
    return model_languages(wildcards.model)


# ---- models x languages ------------------------------------------------------------------------


def model_lang_pairs():
    return [
        (alias, lang) for alias, spec in MODELS.items() for lang in spec["languages"]
    ]


def expand_pairs(pattern):
    """``pattern`` with {model} and {lang} filled for every model and each of its languages."""
    return [
        pattern.format(model=alias, lang=lang) for alias, lang in model_lang_pairs()
    ]


# ---- attribution --------------------------------------------------------------------------


def max_steps():
    """attribution.max_steps as a number (auto: 4 x steps) or None (no refinement)."""
    value = config["attribution"]["max_steps"]
    steps = config["attribution"]["steps"]
    if value == "auto":
        return 4 * steps
    return None if value is None or value <= steps else value


def attribution_science(**extra):
    """The attribution settings that change a part's records, as one params dict."""
    science = {
        key: config["attribution"][key]
        for key in ("shards", "method", "steps", "quadrature", "keep_top")
    }
    return {
        **science,
        "max_steps": max_steps(),
        **extra,
        "version": VERSIONS["attribution"],
    }


def checked_input(wildcards):
    """attribute_checked's inputs: the part's facts (calibration: the discovery facts) and the
    model. Without attribution.full_matrices the job waits for aggregate_dkn (a checkpoint),
    whose layer sets reach it through params (checked_layers); the DKN document is no input
    file, so a DKN change that keeps the model-language's layer sets reruns none of these jobs.
    """
    facts = "discovery" if wildcards.part == "calibration" else wildcards.part
    if not config["attribution"]["full_matrices"]:
        checkpoints.aggregate_dkn.get(model=wildcards.model, lang=wildcards.lang)
    return {
        "facts": f"results/data/facts/{wildcards.lang}/{facts}.parquet",
        "model": model_input(wildcards),
    }


def checked_layers(wildcards):
    """relation -> the layers attribute_checked attributes (those of its DKN and control sets,
    kneurons.records.attributed_layers), from aggregate_dkn's output; None (every layer)
    with attribution.full_matrices."""
    if config["attribution"]["full_matrices"]:
        return None
    done = checkpoints.aggregate_dkn.get(model=wildcards.model, lang=wildcards.lang)
    return attributed_layers(json.loads(Path(done.output.dkn).read_text()))


def attribution_shards(part):
    """Input function: the job's model and language's shards of attribution part ``part``."""

    def shards(wildcards):
        return [
            f"results/attribution/{wildcards.model}/{wildcards.lang}/{part}/shard-{shard}.parquet"
            for shard in SHARDS
        ]

    return shards


# ---- neurons ----------------------------------------------------------------------------


def kn_threshold_in(lang):
    """τ of ``lang``: neurons.kn_threshold is a number or a map language -> number."""
    value = config["neurons"]["kn_threshold"]
    if not isinstance(value, dict):
        return value
    if lang not in value:
        raise ValueError(
            f"config: neurons.kn_threshold has no value for language {lang!r}"
        )
    return value[lang]


def kn_threshold_of(wildcards):
    """τ of the job's language."""
    return kn_threshold_in(wildcards.lang)


def kn_thresholds_of_model(wildcards):
    """{language: τ} for each of the job's model's languages."""
    return {lang: kn_threshold_in(lang) for lang in model_languages(wildcards.model)}


# ---- language-independent knowledge neurons (models with several languages) --------------

LIKN_MODELS = [alias for alias in MODELS if len(MODELS[alias]["languages"]) >= 2]


def likn_languages(wildcards):
    return model_languages(wildcards.model)


def likn_attribution_input(wildcards):
    """{attribution_<lang>: the model's discovery shards of <lang>} for each of its languages."""
    return {
        f"attribution_{lang}": [
            f"results/attribution/{wildcards.model}/{lang}/discovery/shard-{shard}.parquet"
            for shard in SHARDS
        ]
        for lang in model_languages(wildcards.model)
    }


def likn_facts_input(wildcards):
    """{facts_<lang>: the discovery facts of <lang>} for each of the model's languages."""
    return {
        f"facts_{lang}": f"results/data/facts/{lang}/discovery.parquet"
        for lang in model_languages(wildcards.model)
    }


def likn_outputs():
    if not LIKN_MODELS:
        return []
    return ["results/reports/likn.csv", "results/reports/likn.md"]


# ---- the run summary ----------------------------------------------------------------


def attribution_runs():
    """(model, language, part) of every attribution run, in a fixed order."""
    return [
        (alias, lang, part)
        for alias, lang in model_lang_pairs()
        for part in ATTRIBUTION_PARTS
    ]


def expand_runs(pattern, shards):
    """``pattern`` filled for every attribution run and shard, run by run."""
    return [
        pattern.format(model=model, lang=lang, part=part, shard=shard)
        for model, lang, part in attribution_runs()
        for shard in shards
    ]


def summary_inputs(wildcards):
    """The report pages and PNG figures of every report rule of this run."""
    reports = [rules.report_fact_check.output, rules.report_completeness.output]
    if LIKN_MODELS:
        reports.append(rules.report_likn.output)
    if config["localization"]["sample"] > 0:
        reports.append(rules.report_localization.output)
    return {
        "reports": [out.md for out in reports],
        "figures": [
            path for out in reports for key, path in out.items() if key.endswith("_png")
        ],
    }


def final_outputs():
    return [
        "results/reports/summary.md",
        "results/reports/fact_check.csv",
        "results/reports/fact_check.md",
        *expand_pairs("results/neurons/{model}/{lang}/neuron_stats.csv"),
        *likn_outputs(),
        *(
            ["results/reports/localization.csv", "results/reports/localization.md"]
            if config["localization"]["sample"] > 0
            else []
        ),
        *[
            f"results/models/{alias}/train_metrics.json"
            for alias, spec in MODELS.items()
            if spec.get("toy")
        ],
    ]
