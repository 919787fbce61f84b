"""Rule download_mlama: fetch the official mLAMA archive and verify its checksum."""
from kneurons.download import download_verified
from kneurons.logs import configure

configure(snakemake.log[0])
download_verified(snakemake.params.url, snakemake.output[0], snakemake.params.sha256)
