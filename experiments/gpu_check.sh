#!/usr/bin/env bash
# The kernels' check on a machine with a GPU, one command, under 5 minutes:
#
#     bash experiments/gpu_check.sh [OUT_DIR]
#
#   1. smoke (~30 s): the real Pallas kernels once each vs the references (experiments/gpu_smoke.py)
#   2. the kernel tests on the device, no interpret mode: pytest -m gpu tests/test_kernels.py
#   3. the benchmark: python -m gqa_uptrain.bench kernels (batch 4, seq 4096, 32 heads,
#      num_kv_heads 32/8/1, head_dim 128, bf16), then a block-size sweep at num_kv_heads 8
#   4. the planner's device check (at most 4 minutes): Llama-2-7B width at 4 layers, GQA-8,
#      4 x 4096 tokens, remat 'full', one GPU: python -m gqa_uptrain.plan --measure compiles the
#      real train step for the GPU, runs two steps, and prints the measured peak memory beside
#      the planned figure
# Expected ~4 minutes for 1-3 (the timeouts cap each step; rows of the benchmark print as they are measured,
# so a step cut short keeps what it had). Prints the README-ready Markdown tables and writes them,
# with the JSON headline, to OUT_DIR
# (default experiments/results/gpu_check_<UTC time>/). Needs jax with CUDA (0.10 or 0.11), flax and
# pytest: `pip install -e ".[dev]"` plus `pip install "jax[cuda12]"` on that machine.
# PYTHON overrides the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-experiments/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
status=0
started=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - started )) s elapsed)"; }

step "1/4 smoke"
if ! timeout 90 "$PYTHON" experiments/gpu_smoke.py 2>&1 | tee "$OUT/smoke.txt"; then
  echo "smoke check failed: stopping (see $OUT/smoke.txt)" >&2
  exit 1
fi

step "2/4 kernel tests on the device (pytest -m gpu)"
if "$PYTHON" -c "import pytest, flax" 2>/dev/null; then
  timeout 120 "$PYTHON" -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider \
    2>&1 | tee "$OUT/tests.txt" || status=1
else
  echo "pytest or flax is not installed: tests skipped (pip install -e '.[dev]')" | tee "$OUT/tests.txt"
  status=1
fi

step "3/4 benchmark"
timeout 200 "$PYTHON" -m gqa_uptrain.bench kernels 2>"$OUT/bench_stderr.txt" | tee "$OUT/bench.txt" \
  || status=1
tail -n 1 "$OUT/bench.txt" > "$OUT/kernels.json"
timeout 60 "$PYTHON" -m gqa_uptrain.bench kernels --sweep-blocks 2>>"$OUT/bench_stderr.txt" \
  | tee "$OUT/sweep.txt" || status=1

step "4/4 planner vs measured peak memory (7B width, 4 layers, one GPU)"
timeout 240 "$PYTHON" -m gqa_uptrain.plan --config=configs/uptrain.py:llama2_7b_gqa8_h100x8 \
  --model=llama2_7b --num_layers=4 --hardware=h200 --measure \
  --config.mesh.fsdp=1 --config.batch_size=4 --config.grad_accum_steps=1 \
  2>&1 | tee "$OUT/plan.txt" || status=1

step "done"
date -u +"measured %Y-%m-%d %H:%M UTC" | tee -a "$OUT/bench.txt"
"$PYTHON" -c "import jax; d = jax.devices()[0]; print(f'device {d.device_kind}, jax {jax.__version__}')" \
  | tee -a "$OUT/bench.txt"
echo "results in $OUT (status $status)"
exit $status
