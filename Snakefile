# kneurons: knowledge neurons, degenerate knowledge neurons and fact checking with AMIG
# (Chen et al., "Journey to the Center of the Knowledge Neurons", AAAI 2024).
from snakemake.utils import min_version

min_version("9.0")


# No configfile here: profiles/default passes config.yaml, and a --configfile on the command
# line takes its place (see the profile).
if not config:
    raise ValueError(
        "no configuration: run with the default profile (it passes config.yaml) or --configfile"
    )


report: "workflow/report/workflow.rst"


# common.smk validates the config (schema and the checks beyond it) before anything else.
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/attribution.smk"
include: "workflow/rules/neurons.smk"
include: "workflow/rules/factcheck.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/likn.smk"
include: "workflow/rules/localization.smk"
include: "workflow/rules/summary.smk"


rule all:
    input:
        final_outputs(),
