"""Rule prepare_mlama: one language of mLAMA -> a facts table and a report of what was dropped."""
from kneurons.io import write_json, write_parquet
from kneurons.logs import configure
from kneurons.mlama import prepare_mlama

configure(snakemake.log[0], echo_warnings=True)
science = snakemake.params.science
table, report = prepare_mlama(
    science["source"], snakemake.wildcards.lang, science["relations"],
    max_facts_per_relation=science["max_facts_per_relation"], cap_seed=science["cap_seed"],
    to_simplified=science["to_simplified"], strict=science["strict"])
write_parquet(table, snakemake.output.table)
write_json(report, snakemake.output.report)
