"""Rule split_facts: per relation, a seeded discovery/evaluation split aligned across languages."""
import logging

import pandas as pd

from kneurons.facts import PARTS, mark_calibration, split_facts, split_report
from kneurons.io import write_json, write_parquet
from kneurons.logs import configure

configure(snakemake.log[0])
params = snakemake.params
science = params.science
languages = list(science["languages"])
tables = {lang: pd.read_parquet(path) for lang, path in zip(languages, snakemake.input)}
sizes = science["sizes"]
splits = split_facts(tables, science["discovery_fraction"], science["seed"], sizes)
splits = mark_calibration(splits, science["calibration_fraction"], science["seed"], sizes)
outputs = iter(snakemake.output.tables)  # expand() order: language, then part
for lang in languages:
    for part in PARTS:
        write_parquet(splits[lang][part], next(outputs))
report = split_report(splits, tables)
for lang in languages:
    logging.info("%s: %s", lang, {part: report[lang][part]["facts"] for part in PARTS})
write_json(report, snakemake.output.report)
