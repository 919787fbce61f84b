# The toy models of the default run, trained on the bundled facts (the hub is not needed).


rule train_toy_model:
    input:
        tables=lambda wildcards: expand(
            "results/data/mlama/{lang}.parquet", lang=toy_model_languages(wildcards)
        ),
        # not read: training waits for corrupt_facts, so that its errors come before any
        # training (it reruns only when the tables or the seed change, which retrain anyway;
        # not ancient(): Snakemake then misses the job's own params changes in that run)
        corrupted="results/data/corrupted/report.json",
    output:
        model=directory("results/models/{model}/model"),
        metrics="results/models/{model}/train_metrics.json",
    log:
        "logs/models/train_toy_model/{model}.log",
    benchmark:
        "benchmarks/runs/train_toy_model/{model}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        arch=lambda wildcards: MODELS[wildcards.model]["arch"],
        languages=toy_model_languages,
        toy=config["toy"],
        seed=config["seed"],
        version=VERSIONS["toy"],
    script:
        "../../scripts/train_toy_model.py"
