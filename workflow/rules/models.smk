# The models' folders: toy models trained on the bundled facts, GGUF models imported once
# (the hub is needed for neither).


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
    wildcard_constraints:
        model=model_aliases("toy"),
    conda:
        "../../envs/torch.yaml"
    # one thread: the two toy models train side by side on two cores (a second thread
    # gains these small models little)
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        science=lambda w: {
            "arch": MODELS[w.model]["arch"],
            "languages": toy_model_languages(w),
            "toy": config["toy"],
            "seed": config["seed"],
            "version": VERSIONS["toy"],
        },
    script:
        "../../scripts/train_toy_model.py"


rule import_model:
    output:
        model=directory("results/models/{model}/model"),
        provenance="results/models/{model}/import.json",
    log:
        "logs/models/import_model/{model}.log",
    benchmark:
        "benchmarks/runs/import_model/{model}.tsv"
    wildcard_constraints:
        model=model_aliases("gguf"),
    conda:
        "../../envs/gguf.yaml"
    threads: 1
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        science=lambda w: {
            "source": gguf_source(w.model),
            "arch": MODELS[w.model]["arch"],
            "key": f"models.{w.model}.gguf",
            "version": VERSIONS["import"],
        },
    script:
        "../../scripts/import_model.py"
