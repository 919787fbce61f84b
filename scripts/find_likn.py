"""Rule find_likn: language-independent knowledge neurons of one model, against permutation nulls."""
import logging

from kneurons.io import write_csv, write_parquet
from kneurons.likn import find_likn
from kneurons.logs import configure
from kneurons.records import read_shards

configure(snakemake.log[0])
params = snakemake.params
science = params.science
records = {lang: read_shards(snakemake.input[f"attribution_{lang}"])[0]
           for lang in science["languages"]}
table, (stats, layers, null) = find_likn(records, science["kn_threshold"], science["max_kn"],
                                         science["seed"])
logging.info("LIKN statistics (all relations):\n%s",
             stats[stats["relation"] == "all"].to_string(index=False))
write_parquet(table, snakemake.output.likn)
write_csv(stats, snakemake.output.stats)
write_csv(layers, snakemake.output.layers)
write_parquet(null, snakemake.output.null)
