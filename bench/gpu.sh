#!/usr/bin/env bash
# GPU benchmarks at paper config, run as one script on a GPU machine (results in $OUT or bench/out).
#   bash bench/gpu.sh
#   QUICK=1 bash bench/gpu.sh        # the same steps at tiny size, to check the script on a CPU
#   TUNE=1 bash bench/gpu.sh         # also the long-compiling tuning variants (> 130 s each)
# Needs torch, lightning, einops, h5py and PyYAML only: synthetic inputs, no environments.
# Every step has its own time limit, so one slow compile cannot take the whole run with it;
# the steps come in order of importance. Results: docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
. bench/gpu_setup.sh  # PYTHONPATH, limit (and the carried wheels, if any)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ -n "${QUICK:-}" ]; then
  train=configs/tworoom_tiny.yaml plan=configs/tworoom_tiny.yaml steps=2 warm=1 reps=1 iters=2 batches="1 2"
else
  train=configs/tworoom.yaml plan=configs/pusht.yaml steps=30 warm=10 reps=10 iters=30 batches="1 50"
fi
# 1. planning latency at paper config (CEM 300 x 30, horizon 5, history 3), bf16, CUDA graphs
limit 140 "$py" bench/plan_latency.py --config $plan --batch $batches --iterations $iters --repeats $reps \
  --amp --compile-mode reduce-overhead --json "$out/plan.jsonl"
# 2. training step, compiled, with a per-kernel profile
limit 110 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm --compile \
  --profile "$out/train_profile.txt" --json "$out/train.jsonl"
# 2b. the training step compiled as train.py --model.compile true does it (parts in place)
limit 110 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm --compile-parts \
  --json "$out/train.jsonl"
# 2c. the same step through the real Trainer loop (logging, clipping, NaN check, progress bar),
# eager and compiled, with its host-device syncs counted; the bare eager step beside it
limit 60 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm --json "$out/train.jsonl"
limit 90 "$py" bench/train_loop.py --config $train --steps $((2 * steps)) --warmup $warm --count-syncs \
  --json "$out/train_loop.jsonl"
limit 150 "$py" bench/train_loop.py --config $train --steps $((2 * steps)) --warmup $warm --compile --count-syncs \
  --json "$out/train_loop.jsonl"
# 3. planning without compilation (bf16) for comparison
limit 50 "$py" bench/plan_latency.py --config $plan --batch $batches --iterations $iters --repeats $((reps > 3 ? 3 : reps)) \
  --warmup 1 --amp --json "$out/plan.jsonl"
# 4. training with FlashAttention instead of cuDNN's attention
limit 80 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm --compile --no-cudnn-sdp \
  --json "$out/train.jsonl"
if [ -n "${TUNE:-}" ]; then
  # 5. inductor's launch-config tuning, and autotuned Triton matmuls that can fuse bias and GELU
  limit 400 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm --compile \
    --coordinate-descent --json "$out/train.jsonl"
  limit 400 "$py" bench/train_throughput.py --config $train --steps $steps --warmup $warm \
    --compile-mode max-autotune-no-cudagraphs --json "$out/train.jsonl"
fi
