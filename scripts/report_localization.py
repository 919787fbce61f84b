"""Rule report_localization: the localization tables, Markdown and figures of every run."""
import pandas as pd

from kneurons.localization_report import FIGURES, localization_report
from kneurons.logs import configure

configure(snakemake.log[0])
science = snakemake.params.science
output = snakemake.output
runs = {pair: pd.read_parquet(path)
        for pair, path in zip(science["pairs"], snakemake.input.tables)}
figures = {name: (output[f"{name}_png"], output[f"{name}_svg"]) for name in FIGURES}
localization_report(runs, output.csv, output.paired_csv, output.completeness_csv, output.md,
                    figures, seed=science["seed"])
