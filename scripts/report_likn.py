"""Rule report_likn: LIKN statistics against their nulls and the cross-lingual editing tables
and tests of every model."""
import pandas as pd

from kneurons.logs import configure
from kneurons.likn_report import LIKN_FIGURES, likn_report

configure(snakemake.log[0])
science = snakemake.params.science
inputs, output = snakemake.input, snakemake.output
runs = [{"model": model, "stats": pd.read_csv(inputs.stats[i]),
         "layers": pd.read_csv(inputs.layers[i]), "null": pd.read_parquet(inputs.nulls[i]),
         "edits": pd.read_csv(inputs.summaries[i]), "tests": pd.read_csv(inputs.tests[i])}
        for i, model in enumerate(science["models"])]
figures = {name: (output[f"{name}_png"], output[f"{name}_svg"]) for name in LIKN_FIGURES}
likn_report(runs, output.csv, output.edit_csv, output.tests_csv, output.md, figures)
