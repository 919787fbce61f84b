"""Rule edit_likn: erase and edit sampled facts through their LIKN and control neuron sets."""
import logging

import pandas as pd
import torch

from kneurons.io import write_csv, write_parquet
from kneurons.likn import cross_lingual_editing, edit_summary, edit_tests
from kneurons.logs import configure
from kneurons.models import load_job_model

progress = configure(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
params = snakemake.params
science = params.science
lm = load_job_model(params.model)
facts = {lang: pd.read_parquet(snakemake.input[f"facts_{lang}"]) for lang in science["languages"]}
results = cross_lingual_editing(
    lm, facts, pd.read_parquet(snakemake.input.likn), edit_sample=science["edit_sample"],
    n_locality=science["locality_facts"], lambda1=science["lambda1"], lambda2=science["lambda2"],
    seed=science["seed"], progress=progress)
logging.info("%d rows, %d facts edited", len(results), results["edited_uuid"].nunique())
write_parquet(results, snakemake.output.edits)
write_csv(edit_summary(results, science["seed"]), snakemake.output.summary)
write_csv(edit_tests(results, science["seed"]), snakemake.output.tests)
