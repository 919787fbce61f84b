"""kneurons: knowledge neurons and degenerate knowledge neurons (Chen et al., AAAI 2024).

The science lives in this package; Snakemake rule scripts under ``scripts/`` only translate
rule inputs and params into calls of it. It never imports snakemake.
"""

__version__ = "0.1.0"
