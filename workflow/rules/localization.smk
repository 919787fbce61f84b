# Stage 7: the localization evaluation. Are they knowledge neurons? Deletion curves at equal k
# (AMIG, IG, gradient x input, activation) and the KN of AMIG and IG erased and enhanced, each
# against a control matched on activation magnitude, for a seeded sample of discovery facts
# (kneurons.localization), and its report (docs/localization.md).


rule localize_neurons:
    input:
        facts="results/data/facts/{lang}/discovery.parquet",
        shards=expand(
            "results/attribution/{{model}}/{{lang}}/discovery/shard-{shard}.parquet",
            shard=SHARDS,
        ),
        model=model_input,
    output:
        "results/localization/{model}/{lang}/localization.parquet",
    log:
        "logs/localization/{model}/{lang}/localize_neurons.log",
    benchmark:
        "benchmarks/runs/localization/{model}/{lang}/localize_neurons.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        # grouped in dicts, as in every rule (docs/operations.md, "Reruns")
        model=model_params,
        attribution={
            "method": config["attribution"]["method"],
            "steps": config["attribution"]["steps"],
            "quadrature": config["attribution"]["quadrature"],
        },
        # neurons.kn_threshold: one number, or a map language -> number
        neurons=lambda w: {
            "kn_threshold": (
                config["neurons"]["kn_threshold"][w.lang]
                if isinstance(config["neurons"]["kn_threshold"], dict)
                else config["neurons"]["kn_threshold"]
            ),
            "max_kn": config["neurons"]["max_kn"],
        },
        localization={
            "sample": config["localization"]["sample"],
            "related_facts": config["localization"]["related_facts"],
            "unrelated_facts": config["localization"]["unrelated_facts"],
            "enhance_factor": config["localization"]["enhance_factor"],
            "deletion_k": list(config["localization"]["deletion_k"]),
            "control_pool": config["localization"]["control_pool"],
            "seed": config["seed"],
            "version": VERSIONS["localization"],
        },
    script:
        "../../scripts/localize_neurons.py"


rule report_localization:
    input:
        tables=expand_pairs("results/localization/{model}/{lang}/localization.parquet"),
    output:
        csv=report(
            "results/reports/localization.csv",
            caption="../report/localization.rst",
            category="Localization: erase and enhance",
        ),
        paired_csv=report(
            "results/reports/localization_paired.csv",
            caption="../report/localization_paired.rst",
            category="Localization: erase and enhance",
        ),
        completeness_csv=report(
            "results/reports/localization_completeness.csv",
            caption="../report/localization_completeness.rst",
            category="Localization: erase and enhance",
        ),
        md=report(
            "results/reports/localization.md",
            caption="../report/localization.rst",
            category="Localization: erase and enhance",
        ),
        localization_curves_png=report(
            "results/reports/figures/localization_curves.png",
            caption="../report/localization_curves.rst",
            category="Localization: erase and enhance",
        ),
        localization_curves_svg="results/reports/figures/localization_curves.svg",
        localization_change_png=report(
            "results/reports/figures/localization_change.png",
            caption="../report/localization_change.rst",
            category="Localization: erase and enhance",
        ),
        localization_change_svg="results/reports/figures/localization_change.svg",
        localization_layers_png=report(
            "results/reports/figures/localization_layers.png",
            caption="../report/localization_layers.rst",
            category="Localization: erase and enhance",
        ),
        localization_layers_svg="results/reports/figures/localization_layers.svg",
    log:
        "logs/report/report_localization.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        science={
            "pairs": [f"{model}/{lang}" for model, lang in model_lang_pairs()],
            "seed": config["seed"],
            "version": VERSIONS["localization"],
        },
    script:
        "../../scripts/report_localization.py"
