#!/usr/bin/env bash
# GPU benchmarks at paper config, run as one script on a GPU machine (results in $OUT or bench/out).
#   bash bench/gpu.sh
#   QUICK=1 bash bench/gpu.sh        # the same stages at tiny size, to check the script on a CPU
#   TUNE=1 bash bench/gpu.sh         # also the long-compiling training variants (> 130 s each)
# Needs torch, lightning, h5py and PyYAML only: synthetic inputs, no environments.
# The stages come in order of what is still open (docs/benchmarks.md): planning latency for one
# env and for 50, the training loop's own cost and syncs, then the compiled training step. Each
# has its own time limit inside one BUDGET (585 s; bench/gpu_setup.sh), so a slow compile cannot
# take the rest with it: a stage gets at most what is left of the budget, and with under 15 s left
# it is skipped. A stage stopped at its limit writes no result (each writes its JSON line at its end);
# the script exits 1 when a stage failed for another reason.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
scratch=$(mktemp -d)  # train_loop.py's runs and exported models: not worth bringing back
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$out"
. bench/gpu_setup.sh  # PYTHONPATH, limit, BUDGET (and the wheels in .whl/, if any)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ -n "${QUICK:-}" ]; then
  train=configs/tworoom_tiny.yaml plan=configs/tworoom_tiny.yaml steps=2 warm=1 reps=1 iters=2 one=1 many=2
  graph=() tuned=(--compile)
else
  train=configs/tworoom.yaml plan=configs/pusht.yaml steps=30 warm=10 reps=10 iters=30 one=1 many=50
  graph=(--graph --no-share) tuned=(--compile-mode max-autotune-no-cudagraphs)
fi
stage() { echo "[$(elapsed) s] $*"; }
# 1. one env at paper config (CEM 300 x 30, horizon 5, history 3), bf16: the whole plan as one
# CUDA graph, the fastest setting so far (63.7 ms on an H200; target 20 ms)
stage "plan latency, one env, one CUDA graph per plan"
limit 90 "$py" bench/plan_latency.py --config $plan --batch $one --iterations $iters --repeats $reps --amp --compile \
  "${graph[@]}" --json "$out/plan.jsonl"
# 2. the same with autotuned kernels (Triton matmuls with their bias and GELU fused)
stage "plan latency, one env, autotuned kernels"
limit 200 "$py" bench/plan_latency.py --config $plan --batch $one --iterations $iters --repeats $reps --amp \
  "${tuned[@]}" "${graph[@]}" --json "$out/plan.jsonl"
# 3. 50 envs in one call, a CUDA graph per rollout (target 100 plans/s); about a minute to compile
stage "plan latency, $many envs"
limit 150 "$py" bench/plan_latency.py --config $plan --batch $many --iterations $iters --repeats $reps \
  --amp --compile-mode reduce-overhead --json "$out/plan.jsonl"
# 4. the training loop's own cost: the bare eager step, then the same through the Trainer
# (logging, clipping, NaN check, progress bar) with its host-device syncs counted
stage "training step, eager; then the Trainer loop"
limit 50 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm --json "$out/train.jsonl"
limit 70 "$py" bench/train_loop.py --config $train --steps $((2 * steps)) --warmup $warm --count-syncs \
  --root "$scratch" --json "$out/train_loop.jsonl"
# 5. the training step compiled (target 3,500 clips/s), with a per-kernel profile, then through the Trainer
stage "training step, compiled"
limit 110 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm --compile \
  --profile "$out/train_profile.txt" --json "$out/train.jsonl"
limit 130 "$py" bench/train_loop.py --config $train --steps $((2 * steps)) --warmup $warm --compile --count-syncs \
  --root "$scratch" --json "$out/train_loop.jsonl"
if [ -n "${TUNE:-}" ]; then
  # 6. inductor's launch-config tuning, and autotuned Triton matmuls that can fuse bias and GELU
  limit 400 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm --compile \
    --coordinate-descent --json "$out/train.jsonl"
  limit 400 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm \
    --compile-mode max-autotune-no-cudagraphs --json "$out/train.jsonl"
fi
stage "done"
if [ "$stage_errors" -gt 0 ]; then
  echo "$stage_errors stage(s) failed (not a time limit): see their output above"
  exit 1
fi
