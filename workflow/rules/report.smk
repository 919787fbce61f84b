# Stage 5: Table 3 and figures, collected by `snakemake --report report.zip`.


rule report_fact_check:
    input:
        metrics=expand_pairs("results/factcheck/{model}/{lang}/metrics.json"),
        scores=expand_pairs("results/factcheck/{model}/{lang}/scores.parquet"),
        curves=expand_pairs("results/factcheck/{model}/{lang}/f1_curve.csv"),
        per_relation=expand_pairs("results/factcheck/{model}/{lang}/per_relation.csv"),
        dkn_layers=expand_pairs("results/neurons/{model}/{lang}/dkn_layers.csv"),
        dkn_stats=expand_pairs("results/neurons/{model}/{lang}/neuron_stats.csv"),
    output:
        csv=report(
            "results/reports/fact_check.csv",
            caption="../report/fact_check.rst",
            category="Fact checking",
        ),
        md=report(
            "results/reports/fact_check.md",
            caption="../report/fact_check.rst",
            category="Fact checking",
        ),
        comparisons=report(
            "results/reports/fact_check_comparisons.csv",
            caption="../report/fact_check_comparisons.rst",
            category="Fact checking",
        ),
        dkn_layers_png=report(
            "results/reports/figures/dkn_layers.png",
            caption="../report/dkn_layers.rst",
            category="Degenerate knowledge neurons",
        ),
        dkn_layers_svg="results/reports/figures/dkn_layers.svg",
        f1_vs_lambda_png=report(
            "results/reports/figures/f1_vs_lambda.png",
            caption="../report/f1_vs_lambda.rst",
            category="Fact checking",
        ),
        f1_vs_lambda_svg="results/reports/figures/f1_vs_lambda.svg",
        roc_png=report(
            "results/reports/figures/roc.png",
            caption="../report/roc.rst",
            category="Fact checking",
        ),
        roc_svg="results/reports/figures/roc.svg",
        per_relation_f1_png=report(
            "results/reports/figures/per_relation_f1.png",
            caption="../report/per_relation_f1.rst",
            category="Fact checking",
        ),
        per_relation_f1_svg="results/reports/figures/per_relation_f1.svg",
    log:
        "logs/report/report_fact_check.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        science={
            "pairs": model_lang_pairs(),
            "version": VERSIONS["factcheck"],
        },
    script:
        "../../scripts/report_fact_check.py"
