# Stage 4: fact checking with the relations' DKN (with_DKN) and by the model itself (wo_DKN).


rule fact_check:
    input:
        # evaluation: true and wrong objects; calibration: the true objects are in the
        # discovery shards (checked rows), the wrong ones in the calibration shards
        evaluation=attribution_shards("evaluation"),
        discovery=attribution_shards("discovery"),
        calibration=attribution_shards("calibration"),
        dkn="results/neurons/{model}/{lang}/dkn_by_relation.json",
        facts="results/data/facts/{lang}/evaluation.parquet",
    output:
        metrics="results/factcheck/{model}/{lang}/metrics.json",
        scores="results/factcheck/{model}/{lang}/scores.parquet",
        calibration="results/factcheck/{model}/{lang}/calibration_scores.parquet",
        curve="results/factcheck/{model}/{lang}/f1_curve.csv",
        per_relation="results/factcheck/{model}/{lang}/per_relation.csv",
    log:
        "logs/factcheck/{model}/{lang}.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        science={
            "thresholds": config["factcheck"]["thresholds"],
            "seed": config["seed"],
            "version": VERSIONS["factcheck"],
        },
    script:
        "../../scripts/fact_check.py"
