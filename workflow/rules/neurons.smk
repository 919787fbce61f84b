# Stage 3: degenerate knowledge neurons per discovery query, then per relation (with control
# sets matched in activation magnitude).


rule detect_dkn:
    input:
        attribution="results/attribution/{model}/{lang}/discovery/shard-{shard}.parquet",
        facts="results/data/facts/{lang}/discovery.parquet",
        model=model_input,
    output:
        dkn="results/neurons/{model}/{lang}/dkn/shard-{shard}.parquet",
        # per relation: sum of mean |FFN activation| over its queries, and their count
        activation="results/neurons/{model}/{lang}/dkn/shard-{shard}.activation.npz",
    log:
        "logs/neurons/{model}/{lang}/dkn/shard-{shard}.log",
    benchmark:
        "benchmarks/runs/neurons/{model}/{lang}/dkn/shard-{shard}.tsv"
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
            "kn_threshold": kn_threshold_of(w),
            "max_kn": config["neurons"]["max_kn"],
            "single_drop": config["neurons"]["dkn_single_drop"],
            "pair_drop": config["neurons"]["dkn_pair_drop"],
            "version": VERSIONS["dkn"],
        },
    script:
        "../../scripts/detect_dkn.py"


# A checkpoint: attribute_checked reads the layer sets of its output (common.smk,
# checked_layers) to know which of its jobs a DKN change reruns.
checkpoint aggregate_dkn:
    input:
        dkn=lambda wildcards: expand(
            "results/neurons/{{model}}/{{lang}}/dkn/shard-{shard}.parquet",
            shard=SHARDS,
        ),
        activation=lambda wildcards: expand(
            "results/neurons/{{model}}/{{lang}}/dkn/shard-{shard}.activation.npz",
            shard=SHARDS,
        ),
        facts="results/data/facts/{lang}/discovery.parquet",
    output:
        dkn="results/neurons/{model}/{lang}/dkn_by_relation.json",
        stats="results/neurons/{model}/{lang}/neuron_stats.csv",
        layers="results/neurons/{model}/{lang}/dkn_layers.csv",
    log:
        "logs/neurons/{model}/{lang}/aggregate_dkn.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        science={
            "relation_threshold": config["neurons"]["relation_threshold"],
            "dkn_count": config["neurons"]["dkn_count"],
            "seed": config["seed"],
            "version": VERSIONS["dkn"],
        },
    script:
        "../../scripts/aggregate_dkn.py"
