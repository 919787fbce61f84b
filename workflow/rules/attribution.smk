# Stage 2: AMIG / IG attribution of every fact's candidates, sharded (GPU jobs).


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
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        model=model_params,
        science={
            "shards": config["attribution"]["shards"],
            "method": config["attribution"]["method"],
            "steps": config["attribution"]["steps"],
            "quadrature": config["attribution"]["quadrature"],
            "keep_top": config["attribution"]["keep_top"],
            "version": VERSIONS["attribution"],
        },
    script:
        "../../scripts/attribute_shard.py"
