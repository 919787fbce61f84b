"""Run Snakemake (a dry run) and write each planned job's params as JSON: [rule, name, value].

Usage: python tests/job_params.py OUT.json [snakemake arguments]. The params are taken right
after the DAG is built, as the values Snakemake records and compares to decide a rerun.
"""
import json
import sys

from snakemake.cli import main
import snakemake.dag as dag  # after snakemake.cli: the modules import each other

OUT = sys.argv[1]
build = dag.DAG.init


async def init(self, *args, **kwargs):
    result = await build(self, *args, **kwargs)
    rows = []
    for job in self.jobs:
        names = {index: name for name, (index, _) in job.params._names.items()}
        rows.extend([job.rule.name, names.get(i), value] for i, value in enumerate(job.params))
    with open(OUT, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, default=repr)
    return result


dag.DAG.init = init
sys.argv = ["snakemake", *sys.argv[2:]]
main()
