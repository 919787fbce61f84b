"""Rule report_fact_check: Table 3 and its comparisons (CSV, Markdown) and the figures of
every model/language."""
import pandas as pd

from kneurons.io import read_json
from kneurons.logs import configure
from kneurons.fact_check_report import FIGURES, fact_check_report

configure(snakemake.log[0])
science = snakemake.params.science
inputs, output = snakemake.input, snakemake.output
runs = [
    {"model": model, "language": lang,
     "metrics": read_json(inputs.metrics[i]),
     "scores": pd.read_parquet(inputs.scores[i]), "f1_curve": pd.read_csv(inputs.curves[i]),
     "per_relation": pd.read_csv(inputs.per_relation[i]),
     "dkn_layers": pd.read_csv(inputs.dkn_layers[i]),
     "dkn_stats": pd.read_csv(inputs.dkn_stats[i])}
    for i, (model, lang) in enumerate(science["pairs"])
]
figures = {name: (output[f"{name}_png"], output[f"{name}_svg"]) for name in FIGURES}
fact_check_report(runs, output.csv, output.md, figures, output.comparisons)
