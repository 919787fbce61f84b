"""Rule import_model: a GGUF model (file or package) -> a Hugging Face folder + provenance."""
import torch

from kneurons.gguf import import_gguf
from kneurons.logs import configure

configure(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
params = snakemake.params
source = {key: value for key, value in params.source.items() if value is not None}
import_gguf(source, params.arch, snakemake.output.model, key=params.key,
            provenance=snakemake.output.provenance)
