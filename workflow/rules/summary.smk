# The run's summary page: the machine, Table 3, the LIKN tables and the figures, for docs/results.


def summary_inputs(wildcards):
    """The report pages and PNG figures of every report rule of this run."""
    reports = [rules.report_fact_check.output]
    if LIKN_MODELS:
        reports.append(rules.report_likn.output)
    if config["localization"]["sample"] > 0:
        reports.append(rules.report_localization.output)
    return {
        "reports": [out.md for out in reports],
        "figures": [
            path for out in reports for key, path in out.items() if key.endswith("_png")
        ],
    }


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
        name=config["name"],
        benchmarks="benchmarks/runs",
    script:
        "../../scripts/summarize_run.py"
