"""Rule attribute_shard: AMIG/IG attribution of one shard of the discovery facts' true objects,
on every layer (GPU if present)."""
import pandas as pd
import torch

from kneurons.logs import configure
from kneurons.models import load_job_model
from kneurons.shards import run_shard

progress = configure(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
params, wildcards = snakemake.params, snakemake.wildcards
science = params.science
lm = load_job_model(params.model)
run_shard(
    lm, pd.read_parquet(snakemake.input.facts), part=wildcards.part, shard=int(wildcards.shard),
    n_shards=science["shards"], method=science["method"], steps=science["steps"],
    max_steps=science["max_steps"], quadrature=science["quadrature"],
    keep_top=science["keep_top"], output=snakemake.output[0],
    batch_queries=snakemake.resources.get("batch_queries", 8), progress=progress,
    identity=params.model,
)
