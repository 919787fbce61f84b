# Stage 2: AMIG / IG attribution, sharded (GPU jobs): the true objects of the discovery facts
# on every layer (attribute_shard), and, after aggregate_dkn, the candidates only fact checking
# reads on the layers of their relation's DKN and control sets (attribute_checked).


rule attribute_shard:
    input:
        facts="results/data/facts/{lang}/{part}.parquet",
        model=model_input,
    output:
        "results/attribution/{model}/{lang}/{part}/shard-{shard}.parquet",
    log:
        "logs/attribution/{model}/{lang}/{part}/shard-{shard}.log",
    benchmark:
        "benchmarks/runs/attribution/{model}/{lang}/{part}/shard-{shard}.tsv"
    wildcard_constraints:
        part="discovery",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        model=model_params,
        science=attribution_science(),
    script:
        "../../scripts/attribute_shard.py"


rule attribute_checked:
    input:
        unpack(checked_input),
    output:
        "results/attribution/{model}/{lang}/{part}/shard-{shard}.parquet",
    log:
        "logs/attribution/{model}/{lang}/{part}/shard-{shard}.log",
    benchmark:
        "benchmarks/runs/attribution/{model}/{lang}/{part}/shard-{shard}.tsv"
    wildcard_constraints:
        part="|".join(CHECKED_PARTS),
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        model=model_params,
        science=attribution_science(
            full_matrices=config["attribution"]["full_matrices"]
        ),
        # relation -> layers (None: every layer): a DKN change reruns these jobs exactly when
        # it changes the model-language's layer sets
        layers=lambda w: {"relation_layers": checked_layers(w)},
    script:
        "../../scripts/attribute_checked.py"
