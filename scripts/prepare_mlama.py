"""Rule prepare_mlama: one language of mLAMA -> a facts table and a report of what was dropped."""
import logging

from kneurons.io import write_json, write_parquet
from kneurons.logs import configure
from kneurons.mlama import cap_facts_per_relation, check_dropped_relations, read_mlama

configure(snakemake.log[0], echo_warnings=True)
params = snakemake.params
science = params.science
relations = None if science["relations"] == "all" else list(science["relations"])
table, report = read_mlama(
    science["source"], snakemake.wildcards.lang, relations, to_simplified=science["to_simplified"]
)
if science["max_facts_per_relation"] is not None:
    table = cap_facts_per_relation(table, science["max_facts_per_relation"], science["cap_seed"])
    report["max_facts_per_relation"] = science["max_facts_per_relation"]
    report["facts_kept"] = len(table)
logging.info("%s: kept %d facts in %d relations", snakemake.wildcards.lang, len(table),
             table["relation"].nunique())
check_dropped_relations(report, strict=science["strict"])
write_parquet(table, snakemake.output.table)
write_json(report, snakemake.output.report)
