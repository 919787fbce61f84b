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
