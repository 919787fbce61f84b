"""Rule summarize_run: the run's summary page (machine, report pages, figures)."""
from kneurons.docs import write_run_summary
from kneurons.logs import configure

configure(snakemake.log[0])
science = snakemake.params.science
write_run_summary(snakemake.output.md, snakemake.output.info, name=science["name"],
                  reports=list(snakemake.input.reports), figures=list(snakemake.input.figures),
                  benchmark_dir=science["benchmarks"])
