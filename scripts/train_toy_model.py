"""Rule train_toy_model: build and train a small model on the bundled facts (no hub)."""
import pandas as pd
import torch

from kneurons.io import write_json
from kneurons.logs import configure
from kneurons.toy import ToyConfig, train_toy_model

progress = configure(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
params = snakemake.params
science = params.science
tables = {lang: pd.read_parquet(path)
          for lang, path in zip(science["languages"], snakemake.input.tables)}
metrics = train_toy_model(tables, science["arch"], ToyConfig.from_dict(science["toy"]),
                          science["seed"], snakemake.output.model, progress=progress)
write_json(metrics, snakemake.output.metrics)
