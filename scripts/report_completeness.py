"""Rule report_completeness: the convergence check of every attribution run, in one table."""
import pandas as pd
import pyarrow.parquet as pq

from kneurons.convergence import completeness_markdown, completeness_table
from kneurons.io import write_text
from kneurons.logs import configure

COLUMNS = ["completeness_error", "steps", "converged"]


def read(path):
    present = set(pq.read_schema(path).names)
    return pd.read_parquet(path, columns=[c for c in COLUMNS if c in present])


configure(snakemake.log[0])
params, files = snakemake.params, list(snakemake.input)
shards = params.science["shards"]
runs = [(model, lang, part, pd.concat([read(path) for path in files[i * shards:(i + 1) * shards]]))
        for i, (model, lang, part) in enumerate(params.science["runs"])]
table = completeness_table(runs, steps=params.attribution["steps"])
write_text(table.to_csv(index=False), snakemake.output.csv)
write_text(completeness_markdown(table, **params.attribution), snakemake.output.md)
