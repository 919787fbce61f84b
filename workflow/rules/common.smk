# Config checks beyond the schema, wildcard constraints and input functions.
import re
from pathlib import Path

# Bumped on purpose whenever a stage's results change for the same params, so that Snakemake
# reruns it (the library is not tracked as code by Snakemake).
VERSIONS = {
    "data": 1,
    "toy": 2,  # = kneurons.toy.TOY_VERSION
    "attribution": 1,
    "dkn": 1,
    "factcheck": 1,
    "likn": 2,
    "import": 1,  # = kneurons.gguf.IMPORT_VERSION
}

LANGUAGES = list(config["mlama"]["languages"])
MODELS = config["models"]
PARTS = ["discovery", "evaluation"]
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
    if is_url(config["mlama"]["source"]) and not config["mlama"]["sha256"]:
        raise ValueError("config: mlama.sha256 is required when mlama.source is a URL")


def is_url(source):
    return re.match(r"^https?://", str(source)) is not None


_check_config()


wildcard_constraints:
    lang="|".join(re.escape(lang) for lang in LANGUAGES),
    model="|".join(re.escape(alias) for alias in MODELS),
    part="|".join(PARTS),
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
    }


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


def final_outputs():
    return [
        "results/reports/fact_check.csv",
        "results/reports/fact_check.md",
        *expand_pairs("results/neurons/{model}/{lang}/neuron_stats.csv"),
        *likn_outputs(),
        *[
            f"results/models/{alias}/train_metrics.json"
            for alias, spec in MODELS.items()
            if spec.get("toy")
        ],
    ]
