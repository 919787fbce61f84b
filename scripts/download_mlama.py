"""Rule download_mlama: fetch the official mLAMA archive and verify it file by file (or by
its own checksum)."""
from kneurons.download import download_verified
from kneurons.logs import configure

configure(snakemake.log[0])
science = snakemake.params.science
download_verified(science["url"], snakemake.output[0], science["sha256"],
                  checksums=science["checksums"], languages=science["languages"])
