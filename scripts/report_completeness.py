"""Rule report_completeness: the convergence check of every attribution run, in one table."""
import pandas as pd

from kneurons.convergence import completeness_markdown, completeness_table
from kneurons.io import write_text
from kneurons.logs import configure

configure(snakemake.log[0])
params, files = snakemake.params, list(snakemake.input)
shards = params.science["shards"]
runs = [(model, lang, part,
         pd.concat([pd.read_parquet(path, columns=["completeness_error"])
                    for path in files[i * shards:(i + 1) * shards]]))
        for i, (model, lang, part) in enumerate(params.science["runs"])]
table = completeness_table(runs)
write_text(table.to_csv(index=False), snakemake.output.csv)
write_text(completeness_markdown(table, **params.attribution), snakemake.output.md)
