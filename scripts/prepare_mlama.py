"""Rule prepare_mlama: one language of mLAMA -> a facts table and a report of what was dropped."""
import logging

from kneurons.io import write_json, write_parquet
from kneurons.logs import configure
from kneurons.mlama import cap_facts_per_relation, check_dropped_relations, read_mlama

configure(snakemake.log[0], echo_warnings=True)
params = snakemake.params
relations = None if params.relations == "all" else list(params.relations)
table, report = read_mlama(
    params.source, snakemake.wildcards.lang, relations, to_simplified=params.to_simplified
)
if params.max_facts_per_relation is not None:
    table = cap_facts_per_relation(table, params.max_facts_per_relation, params.cap_seed)
    report["max_facts_per_relation"] = params.max_facts_per_relation
    report["facts_kept"] = len(table)
logging.info("%s: kept %d facts in %d relations", snakemake.wildcards.lang, len(table),
             table["relation"].nunique())
check_dropped_relations(report, strict=params.strict)
write_parquet(table, snakemake.output.table)
write_json(report, snakemake.output.report)
