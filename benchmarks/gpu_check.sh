#!/usr/bin/env bash
# The GPU check (issue #24), one command on a GPU node, about 8 minutes on one H200 from a bare
# checkout: every model is built from a config (no weights, no downloads).
#
#   benchmarks/gpu_check.sh [OUT]          (default OUT: benchmarks/runs/gpu-check)
#
# 1. the tests marked gpu (tests/test_gpu.py: every registered architecture on CUDA against
#    the CPU, reduced precision, the device lease; 47 s on the H200) while the CPU reference
#    of 3 runs beside them (94 s on its 16 cores);
# 2. the gpu benchmark mode (benchmarks/attribution.py gpu: BERT-base, GPT-2 small, Gemma 3
#    270M, SmolLM2-135M and mGPT shapes; fp32, tf32, bf16; batch sizes up to memory), within
#    a time budget per model;
# 3. the whole DAG on one GPU against the same DAG on the CPU (benchmarks/gpu_dag.py; its
#    GPU jobs run one at a time, ~15 s each).
# Everything lands in OUT: check.log (all output), machine.txt, gpu-tests.log, gpu-gpu.json,
# dag.json, dag-logs.tar.gz. Copy gpu-gpu.json, dag.json (as gpu-dag.json), gpu-tests.log and
# machine.txt (as gpu-machine.txt) to benchmarks/results/ and run `make docs`.
# PYTHON: the interpreter (default .venv/bin/python where it exists, else python3); it needs
# torch, transformers, numpy, pandas, pyarrow, pyyaml, pytest, and snakemake for step 3.
# KNEURONS_GPU_CHECK_SIZE=tiny: tiny benchmark models (the script's own test, on the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-benchmarks/runs/gpu-check}" && cd "${1:-benchmarks/runs/gpu-check}" && pwd)
WORK=${KNEURONS_GPU_CHECK_WORK:-$(mktemp -d /tmp/kneurons-gpu-check.XXXXXX)}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/check.log"
: >"$LOG"
step() { echo "== $* ($(date -u +%H:%M:%S) UTC)" | tee -a "$LOG"; }
status=0

step "0. machine"
{
  date -u; nvidia-smi 2>&1; lscpu 2>&1 | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400
  "$PYTHON" -c "import sys, torch, transformers; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', \
transformers.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'none')"
  git rev-parse --short HEAD 2>/dev/null; git status --porcelain --untracked-files=no 2>/dev/null
} >"$OUT/machine.txt" 2>&1
tail -n 3 "$OUT/machine.txt" | tee -a "$LOG"

step "1. gpu tests, and beside them the DAG's CPU reference"
(timeout 150 "$PYTHON" benchmarks/gpu_dag.py reference "$WORK" >"$WORK.reference.log" 2>&1
 echo "reference exit $?" >>"$WORK.reference.log") &
reference=$!
timeout 150 "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -rA -p no:cacheprovider \
  >"$OUT/gpu-tests.log" 2>&1 || status=1
tail -n 4 "$OUT/gpu-tests.log" | tee -a "$LOG"
wait "$reference"
tail -n 1 "$WORK.reference.log" | tee -a "$LOG"

step "2. gpu benchmark mode"
timeout 220 "$PYTHON" benchmarks/attribution.py gpu --check-cpu 1 --budget-s 20 \
  --gpu-models bert gpt2 gemma3 smollm2 mgpt \
  --size "${KNEURONS_GPU_CHECK_SIZE:-base}" \
  --out "$OUT/gpu-gpu.json" 2>&1 | tee -a "$LOG" || status=1

step "3. the whole DAG on one GPU against the CPU"
timeout 240 "$PYTHON" benchmarks/gpu_dag.py device "$WORK" "$OUT" 2>&1 | tail -n 40 \
  | tee -a "$LOG" || status=1
[ -f "$OUT/dag.json" ] || status=1

step "done (exit $status)"
exit $status
