# Stage 6: language-independent knowledge neurons (LIKN) of the models with several languages
# against permutation nulls, the cross-lingual erasing and editing experiment with paired
# tests, and its report.


rule find_likn:
    input:
        unpack(likn_attribution_input),
    output:
        likn="results/neurons/{model}/likn.parquet",
        stats="results/neurons/{model}/likn_stats.csv",
        layers="results/neurons/{model}/likn_layers.csv",
        null="results/neurons/{model}/likn_null.parquet",
    log:
        "logs/neurons/{model}/find_likn.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        science=lambda w: {
            "languages": likn_languages(w),
            "kn_threshold": kn_thresholds_of_model(w),
            "max_kn": config["neurons"]["max_kn"],
            "seed": config["seed"],
            "version": VERSIONS["likn"],
        },
    script:
        "../../scripts/find_likn.py"


rule edit_likn:
    input:
        unpack(likn_facts_input),
        likn="results/neurons/{model}/likn.parquet",
        model=model_input,
    output:
        edits="results/neurons/{model}/likn_edit.parquet",
        summary="results/neurons/{model}/likn_edit_summary.csv",
        tests="results/neurons/{model}/likn_edit_tests.csv",
    log:
        "logs/neurons/{model}/edit_likn.log",
    benchmark:
        "benchmarks/runs/neurons/{model}/edit_likn.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        model=model_params,
        science=lambda w: {
            "languages": likn_languages(w),
            "edit_sample": config["likn"]["edit_sample"],
            "locality_facts": config["likn"]["locality_facts"],
            "lambda1": config["likn"]["lambda1"],
            "lambda2": config["likn"]["lambda2"],
            "seed": config["seed"],
            "version": VERSIONS["likn"],
        },
    script:
        "../../scripts/edit_likn.py"


rule report_likn:
    input:
        stats=expand("results/neurons/{model}/likn_stats.csv", model=LIKN_MODELS),
        layers=expand("results/neurons/{model}/likn_layers.csv", model=LIKN_MODELS),
        nulls=expand("results/neurons/{model}/likn_null.parquet", model=LIKN_MODELS),
        summaries=expand(
            "results/neurons/{model}/likn_edit_summary.csv", model=LIKN_MODELS
        ),
        tests=expand("results/neurons/{model}/likn_edit_tests.csv", model=LIKN_MODELS),
    output:
        csv=report(
            "results/reports/likn.csv",
            caption="../report/likn.rst",
            category="Language-independent knowledge neurons",
        ),
        edit_csv=report(
            "results/reports/likn_edit.csv",
            caption="../report/likn_edit.rst",
            category="Language-independent knowledge neurons",
        ),
        tests_csv=report(
            "results/reports/likn_edit_tests.csv",
            caption="../report/likn_edit_tests.rst",
            category="Language-independent knowledge neurons",
        ),
        md=report(
            "results/reports/likn.md",
            caption="../report/likn.rst",
            category="Language-independent knowledge neurons",
        ),
        likn_null_png=report(
            "results/reports/figures/likn_null.png",
            caption="../report/likn_null.rst",
            category="Language-independent knowledge neurons",
        ),
        likn_null_svg="results/reports/figures/likn_null.svg",
        likn_layers_png=report(
            "results/reports/figures/likn_layers.png",
            caption="../report/likn_layers.rst",
            category="Language-independent knowledge neurons",
        ),
        likn_layers_svg="results/reports/figures/likn_layers.svg",
        likn_erase_png=report(
            "results/reports/figures/likn_erase.png",
            caption="../report/likn_erase.rst",
            category="Language-independent knowledge neurons",
        ),
        likn_erase_svg="results/reports/figures/likn_erase.svg",
        likn_edit_png=report(
            "results/reports/figures/likn_edit.png",
            caption="../report/likn_edit_figure.rst",
            category="Language-independent knowledge neurons",
        ),
        likn_edit_svg="results/reports/figures/likn_edit.svg",
    log:
        "logs/report/report_likn.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        science={
            "models": LIKN_MODELS,
            "version": VERSIONS["likn"],
        },
    script:
        "../../scripts/report_likn.py"
