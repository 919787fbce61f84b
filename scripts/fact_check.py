"""Rule fact_check: Table 3's with_DKN and wo_DKN judgements of one model and language."""
import json
import logging

import pandas as pd

from kneurons.factcheck import check_facts, dkn_by_relation
from kneurons.io import atomic_path, write_json, write_parquet
from kneurons.logs import configure
from kneurons.records import read_shards

configure(snakemake.log[0])
science = snakemake.params.science
evaluation, meta = read_shards(snakemake.input.evaluation)
discovery, _ = read_shards(snakemake.input.discovery)
dkn = dkn_by_relation(json.loads(open(snakemake.input.dkn, encoding="utf-8").read()))
result = check_facts(evaluation, discovery, dkn, meta["n_layers"], meta["d_ff"],
                     science["thresholds"], pd.read_parquet(snakemake.input.facts))
logging.info("settings %s, dropped %s: %s", result["settings"], result["dropped"],
             result["metrics"])
write_json({key: result[key] for key in ("settings", "dropped", "metrics")},
           snakemake.output.metrics)
write_parquet(result["scores"], snakemake.output.scores)
write_parquet(result["calibration_scores"], snakemake.output.calibration)
for table, path in ((result["f1_curve"], snakemake.output.curve),
                    (result["per_relation"], snakemake.output.per_relation)):
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
