"""Rule localize_neurons: deletion curves and KN interventions of a sample (kneurons.localization)."""
import pandas as pd
import torch

from kneurons.localization import localize_to
from kneurons.logs import configure
from kneurons.models import load_job_model

progress = configure(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
params = snakemake.params
lm = load_job_model(params.model)
attribution, stage = params.attribution, params.localization
localize_to(
    lm, pd.read_parquet(snakemake.input.facts), snakemake.input.shards, snakemake.output[0],
    run_method=attribution["method"], steps=attribution["steps"],
    quadrature=attribution["quadrature"], kn_threshold=float(params.neurons["kn_threshold"]),
    max_kn=params.neurons["max_kn"], sample=stage["sample"],
    n_related=stage["related_facts"], n_unrelated=stage["unrelated_facts"],
    enhance_factor=stage["enhance_factor"], deletion_k=stage["deletion_k"],
    control_pool=stage["control_pool"], seed=stage["seed"],
    batch_facts=snakemake.resources.get("batch_facts", 4),
    batch_rows=snakemake.resources.get("batch_rows", 32), identity=params.model,
    progress=progress)
