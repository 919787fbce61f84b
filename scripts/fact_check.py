"""Rule fact_check: Table 3's with_DKN and wo_DKN judgements of one model and language."""
import logging

import pandas as pd

from kneurons.factcheck import check_facts, dkn_by_relation
from kneurons.io import read_json, write_csv, write_json, write_parquet
from kneurons.logs import configure
from kneurons.records import read_shards

configure(snakemake.log[0])
science = snakemake.params.science
evaluation, meta = read_shards(snakemake.input.evaluation)
discovery, _ = read_shards(snakemake.input.discovery)
dkn = dkn_by_relation(read_json(snakemake.input.dkn))
result = check_facts(evaluation, discovery, dkn, meta["n_layers"], meta["d_ff"],
                     science["thresholds"], pd.read_parquet(snakemake.input.facts))
logging.info("settings %s, dropped %s: %s", result["settings"], result["dropped"],
             result["metrics"])
write_json({key: result[key] for key in ("settings", "dropped", "metrics")},
           snakemake.output.metrics)
write_parquet(result["scores"], snakemake.output.scores)
write_parquet(result["calibration_scores"], snakemake.output.calibration)
write_csv(result["f1_curve"], snakemake.output.curve)
write_csv(result["per_relation"], snakemake.output.per_relation)
