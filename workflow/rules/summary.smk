# The run's summary page: the machine, Table 3, the LIKN tables and the figures, for docs/results.


rule summarize_run:
    input:
        unpack(summary_inputs),
    output:
        md="results/reports/summary.md",
        info="results/reports/run.json",
    log:
        "logs/report/summarize_run.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        science={
            "name": config["name"],
            "benchmarks": "benchmarks/runs",
        },
    script:
        "../../scripts/summarize_run.py"


rule report_completeness:
    input:
        expand_runs(
            "results/attribution/{model}/{lang}/{part}/shard-{shard}.parquet", SHARDS
        ),
    output:
        csv="results/reports/completeness.csv",
        md=report(
            "results/reports/completeness.md",
            caption="../report/completeness.rst",
            category="Convergence check",
        ),
    log:
        "logs/report/report_completeness.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        science={
            "runs": [list(run) for run in attribution_runs()],
            "shards": len(SHARDS),
        },
        attribution={
            **{
                key: config["attribution"][key]
                for key in ("method", "steps", "quadrature")
            },
            "max_steps": max_steps(),
        },
    script:
        "../../scripts/report_completeness.py"
