#!/usr/bin/env bash
# GPU benchmarks, run as one script on a lent GPU machine (writes JSON lines to $OUT or bench/out).
#   bash bench/gpu.sh
# Needs torch, lightning, einops and PyYAML only (synthetic data: no environments needed).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
steps="${STEPS:-30}"
for config in configs/tworoom.yaml configs/tworoom_tiny.yaml; do
  "$py" bench/train_throughput.py --config "$config" --steps "$steps" --warmup 5 --json "$out/train.jsonl"
  "$py" bench/train_throughput.py --config "$config" --steps "$steps" --warmup 10 --compile --json "$out/train.jsonl"
done
# Planning latency at paper config (CEM 300 x 30, horizon 5, history 3): one env, and 50 batched.
reps="${REPEATS:-10}"
"$py" bench/plan_latency.py --config configs/pusht.yaml --batch 1 50 --repeats "$reps" --json "$out/plan.jsonl"
"$py" bench/plan_latency.py --config configs/pusht.yaml --batch 1 50 --repeats "$reps" --amp --json "$out/plan.jsonl"
"$py" bench/plan_latency.py --config configs/pusht.yaml --batch 1 50 --repeats "$reps" --amp --compile --json "$out/plan.jsonl"
