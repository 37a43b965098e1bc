#!/usr/bin/env bash
# The kernels' check on a machine with a GPU, one command, within 5 minutes (DEADLINE):
#
#     bash experiments/gpu_check.sh [OUT_DIR]
#
#   1. smoke: the real Pallas kernels once each vs the references, then attention('auto') under
#      jax.set_mesh as the trainer calls it (kernels inside shard_map: the Pallas flash kernel on
#      packed rows, cuDNN without segment ids) (experiments/gpu_smoke.py)
#   2. the kernel tests on the device, no interpret mode (pytest -m gpu tests/test_kernels.py:
#      flash, decode, the model step, cuDNN and the kernels in shard_map), then the sharded step
#      (tests/test_attention_mesh.py: the trainer's train and decode steps exported for 'cuda' and
#      'tpu' on 8 simulated CPU devices with this machine's jax, every kernel call per shard)
#   3. the benchmark: python -m gqa_uptrain.bench kernels (batch 4, seq 4096, 32 heads,
#      num_kv_heads 32/8/1, head_dim 128, bf16; pallas against xla and cudnn), then, if time is
#      left, a block-size sweep at num_kv_heads 8
#   4. the planner's device check (at most 4 minutes): Llama-2-7B width at 4 layers, GQA-8,
#      4 x 4096 tokens, remat 'full', one GPU: python -m gqa_uptrain.plan --measure compiles the
#      real train step for the GPU, runs two steps, and prints the measured peak memory beside
#      the planned figure
# Time: every step's timeout is cut to the time left before one DEADLINE (300 s from the start),
# steps 1-3 keeping PLAN_RESERVE seconds for step 4, so the whole script ends within 5 minutes
# whatever hangs. None of the step durations has been measured yet (no GPU session so far): the
# caps are estimates. Rows of the benchmark print as they are measured, so a step cut short keeps
# what it had. Prints the README-ready Markdown tables and writes them, with the JSON headline, to
# OUT_DIR (default experiments/results/gpu_check_<UTC time>/). Needs jax with CUDA (0.10 or 0.11),
# flax and pytest: `pip install -e ".[dev]"` plus `pip install "jax[cuda12]"` on that machine.
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

DEADLINE=300
PLAN_RESERVE=120  # step 4's share; the planner's own cap is 240 s when that much is left
left() { echo $(( DEADLINE - ($(date +%s) - started) )); }
# capped SECONDS [RESERVE]: min(SECONDS, time left minus RESERVE (default PLAN_RESERVE)); 0 when
# fewer than 10 s would be left, and the step is skipped.
capped() {
  local room=$(( $(left) - ${2:-$PLAN_RESERVE} ))
  if (( room < 10 )); then echo 0; elif (( room < $1 )); then echo "$room"; else echo "$1"; fi
}
skipped() { echo "skipped: no time left before the ${DEADLINE} s deadline" | tee "$OUT/$1"; status=1; }

step "1/4 smoke"
t=$(capped 45)
if ! timeout "$t" "$PYTHON" experiments/gpu_smoke.py 2>&1 | tee "$OUT/smoke.txt"; then
  echo "smoke check failed: stopping (see $OUT/smoke.txt)" >&2
  exit 1
fi

step "2/4 kernel tests on the device (pytest -m gpu), then the sharded step"
if "$PYTHON" -c "import pytest, flax" 2>/dev/null; then
  t=$(capped 75)
  if (( t > 0 )); then
    timeout "$t" "$PYTHON" -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider \
      2>&1 | tee "$OUT/tests.txt" || status=1
  else skipped tests.txt; fi
  t=$(capped 40)
  if (( t > 0 )); then
    timeout "$t" "$PYTHON" -m pytest tests/test_attention_mesh.py -q -p no:cacheprovider \
      2>&1 | tee "$OUT/sharded_step.txt" || status=1
  else skipped sharded_step.txt; fi
else
  echo "pytest or flax is not installed: tests skipped (pip install -e '.[dev]')" | tee "$OUT/tests.txt"
  status=1
fi

step "3/4 benchmark"
t=$(capped 150)
if (( t > 0 )); then
  timeout "$t" "$PYTHON" -m gqa_uptrain.bench kernels 2>"$OUT/bench_stderr.txt" \
    | tee "$OUT/bench.txt" || status=1
  tail -n 1 "$OUT/bench.txt" > "$OUT/kernels.json"
else skipped bench.txt; fi
t=$(capped 45)
if (( t >= 25 )); then  # the sweep is extra: only with room for a few of its rows
  timeout "$t" "$PYTHON" -m gqa_uptrain.bench kernels --sweep-blocks 2>>"$OUT/bench_stderr.txt" \
    | tee "$OUT/sweep.txt" || status=1
else
  echo "sweep skipped: ${t} s left before step 4's reserve" | tee "$OUT/sweep.txt"
fi

step "4/4 planner vs measured peak memory (7B width, 4 layers, one GPU)"
t=$(capped 240 15)  # 15 s kept for the closing device line (timeout 0 would mean no limit)
timeout "$(( t > 0 ? t : 1 ))" "$PYTHON" -m gqa_uptrain.plan --config=configs/uptrain.py:llama2_7b_gqa8_h100x8 \
  --model=llama2_7b --num_layers=4 --hardware=h200 --measure \
  --config.mesh.fsdp=1 --config.batch_size=4 --config.grad_accum_steps=1 \
  2>&1 | tee "$OUT/plan.txt" || status=1

step "done"
date -u +"measured %Y-%m-%d %H:%M UTC" | tee -a "$OUT/bench.txt"
timeout 15 "$PYTHON" -c "import jax; d = jax.devices()[0]; print(f'device {d.device_kind}, jax {jax.__version__}')" \
  | tee -a "$OUT/bench.txt"
echo "results in $OUT (status $status)"
exit $status
