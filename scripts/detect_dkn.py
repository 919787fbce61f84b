"""Rule detect_dkn: degenerate knowledge-neuron pairs of one discovery shard's queries."""
from pathlib import Path

import pandas as pd
import torch

from kneurons.checkpoint import open_checkpoint
from kneurons.dkn import detect_dkn_records
from kneurons.io import write_parquet
from kneurons.logs import configure
from kneurons.models import load_job_model
from kneurons.records import read_shard

progress = configure(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
params = snakemake.params
lm = load_job_model(params.model)
records, _ = read_shard(snakemake.input.attribution)
science = params.science
options = {key: science[key] for key in ("kn_threshold", "max_kn", "single_drop", "pair_drop")}
checkpoint = open_checkpoint(Path(snakemake.output[0] + ".checkpoint"),
                             options={**options, "version": science["version"]},
                             model=params.model,
                             files={"attribution": snakemake.input.attribution,
                                    "facts": snakemake.input.facts})
found = detect_dkn_records(lm, pd.read_parquet(snakemake.input.facts), records, **options,
                           checkpoint=checkpoint, progress=progress)
write_parquet(found, snakemake.output[0])
checkpoint.remove()
