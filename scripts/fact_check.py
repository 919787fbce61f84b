"""Rule fact_check: Table 3 of one model and language: with_DKN, wo_DKN, the baselines and
controls, with bootstrap intervals and paired tests."""
import logging

import pandas as pd

from kneurons.factcheck import check_facts
from kneurons.io import read_json, write_csv, write_json, write_parquet
from kneurons.logs import configure
from kneurons.records import read_shards

configure(snakemake.log[0])
science = snakemake.params.science
evaluation, meta = read_shards(snakemake.input.evaluation)
# the calibration slice: true objects in the discovery shards, wrong ones in the calibration shards
discovery, _ = read_shards([*snakemake.input.discovery, *snakemake.input.calibration])
result = check_facts(evaluation, discovery, read_json(snakemake.input.dkn), meta["n_layers"],
                     meta["d_ff"], science["thresholds"], pd.read_parquet(snakemake.input.facts),
                     seed=science["seed"])
logging.info("settings %s, λ_p %s, dropped %s", result["settings"], result["prob_threshold"],
             result["dropped"])
keys = ("settings", "prob_threshold", "dropped", "uncertainty", "rows", "comparisons")
write_json({key: result[key] for key in keys}, snakemake.output.metrics)
write_parquet(result["scores"], snakemake.output.scores)
write_parquet(result["calibration_scores"], snakemake.output.calibration)
write_csv(result["f1_curve"], snakemake.output.curve)
write_csv(result["per_relation"], snakemake.output.per_relation)
