"""Rule aggregate_dkn: each relation's DKN set, its control sets and stability, and KN/DKN
statistics of a model and language."""
import logging

import pandas as pd

from kneurons.dkn import aggregate_relations, relation_activation
from kneurons.io import write_csv, write_json
from kneurons.logs import configure

configure(snakemake.log[0])
science = snakemake.params.science
query_dkn = pd.concat([pd.read_parquet(path) for path in snakemake.input.dkn], ignore_index=True)
facts = pd.read_parquet(snakemake.input.facts)
calibration = facts.loc[facts["calibration"].astype(bool), "uuid"] if "calibration" in facts else []
summary, stats, layers = aggregate_relations(
    query_dkn, science["relation_threshold"], calibration, science["dkn_count"],
    activation=relation_activation(getattr(snakemake.input, "activation", [])),
    seed=science["seed"])
logging.info("%d relations, %d with DKN, %d of them unstable", len(stats),
             int((stats["n_dkn"] > 0).sum()), int(((stats["n_dkn"] > 0) & ~stats["stable"]).sum()))
write_json(summary, snakemake.output.dkn)
write_csv(stats, snakemake.output.stats)
write_csv(layers, snakemake.output.layers)
