"""Rule detect_dkn: degenerate knowledge-neuron pairs of one discovery shard's queries, and the
mean |FFN activation| of its relations' queries (for aggregate_dkn's matched controls)."""
from pathlib import Path

import pandas as pd
import torch

from kneurons.checkpoint import open_checkpoint
from kneurons.dkn import (detect_dkn_records, detected_queries, relation_activation_sums,
                          write_activation)
from kneurons.io import write_parquet
from kneurons.logs import configure
from kneurons.models import load_job_model
from kneurons.records import read_shard

progress = configure(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
params, output = snakemake.params, snakemake.output
lm = load_job_model(params.model)
records, _ = read_shard(snakemake.input.attribution)
facts = pd.read_parquet(snakemake.input.facts)
science = params.science
options = {key: science[key] for key in ("kn_threshold", "max_kn", "single_drop", "pair_drop")}
checkpoint = open_checkpoint(Path(output.dkn + ".checkpoint"),
                             options={**options, "version": science["version"]},
                             model=params.model,
                             files={"attribution": snakemake.input.attribution,
                                    "facts": snakemake.input.facts})
found = detect_dkn_records(lm, facts, records, **options, checkpoint=checkpoint,
                           progress=progress)
activation = relation_activation_sums(lm, detected_queries(facts, records), progress=progress)
write_activation(activation, output.activation)
write_parquet(found, output.dkn)
checkpoint.remove()
