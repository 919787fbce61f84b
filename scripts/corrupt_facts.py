"""Rule corrupt_facts: give every fact one wrong object (the same entity in every language)."""
import logging

import pandas as pd

from kneurons.facts import corrupt_facts, corruption_report
from kneurons.io import write_json, write_parquet
from kneurons.logs import configure
from kneurons.mlama import relation_differences

configure(snakemake.log[0], echo_warnings=True)
science = snakemake.params.science
languages = list(science["languages"])
tables = {lang: pd.read_parquet(path) for lang, path in zip(languages, snakemake.input)}
relation_differences({lang: sorted(set(table["relation"])) for lang, table in tables.items()})
corrupted = corrupt_facts(tables, science["seed"])
report = corruption_report(tables, corrupted)
logging.info("kept %d of %d facts", report["facts_out"], report["facts_in"])
for lang, path in zip(languages, snakemake.output.tables):
    write_parquet(corrupted[lang], path)
write_json(report, snakemake.output.report)
