"""Rule import_model: a GGUF model (file or package) -> a Hugging Face folder + provenance."""
import torch

from kneurons.gguf import import_gguf
from kneurons.logs import configure

configure(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
params = snakemake.params
science = params.science
source = {key: value for key, value in science["source"].items() if value is not None}
import_gguf(source, science["arch"], snakemake.output.model, key=science["key"],
            provenance=snakemake.output.provenance)
