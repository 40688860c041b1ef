#!/usr/bin/env bash
# Example:
#   bash bench/gpu_wheels.sh                 # here, once: the wheels the GPU image lacks, in .whl/
#   bash bench/gpu_all.sh                    # there, with .whl/ copied along
#   QUICK=1 bash bench/gpu_all.sh            # tiny sizes, to check the script on a CPU (no .whl/ there)
# Every GPU check in one command that ends within 10 minutes: planning latency at paper config
# (50 envs with CUDA graphs per rollout; one env as one CUDA graph per plan), then Push-T at the
# paper's architecture end to end (bench/pusht_gpu.sh) with the time that is left, its data
# generated on the CPU cores while the latency benchmarks use the GPU. For the longest Push-T
# training instead, run `MINUTES=5 bash bench/pusht_gpu.sh` alone.
# BUDGET (585 s) is the whole run's length: the Push-T training gets what the other stages leave.
# Results in $OUT (or bench/out), at most 8 files: plan_latency.jsonl, plan.json, probe.json,
# plan_deadline.json, logs.tgz (every log and the TensorBoard events) and
# gpu_all.log (this script's output).
set -uo pipefail
cd "$(dirname "$0")/.."
final="${OUT:-bench/out}"
mkdir -p "$final" data
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # what is worth keeping goes to $final (logs.tgz)
exec > >(tee "$final/gpu_all.log") 2>&1
. bench/gpu_setup.sh  # wheels, PYTHONPATH, limit, elapsed and the shared BUDGET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
ncpu=$(nproc)

if [ -n "${QUICK:-}" ]; then
  episodes=24 res=64 plan=configs/pusht_tiny.yaml batches="1 2" iters=2 reps=1 graph=() pin=()
else
  episodes=${EPISODES:-2000} res=224 plan=configs/pusht.yaml batches="1 50" iters=30 reps=10 graph=(--graph) pin=()
  # the data collector stays off the first 4 cores, which the benchmarks' Python and compiler use
  [ "$ncpu" -ge 8 ] && command -v taskset >/dev/null && pin=(taskset -c "4-$((ncpu - 1))")
fi
data="data/pusht_gpu_${res}_${episodes}.h5"

# 0. Push-T data in the background (CPU only)
if [ ! -f "$data" ]; then
  ( start=$(date +%s)
    limit 240 "${pin[@]}" "$py" -m leworld.data.collect --env pusht --episodes "$episodes" --steps 100 --resolution "$res" \
      --policy mix --seed 0 --out "$data" --workers $(( ncpu > 4 ? ncpu - 4 : 1 )) --quiet
    echo "collect: $(( $(date +%s) - start )) s, ended at $(elapsed) s" ) > "$work/collect.log" 2>&1 &
  collector=$!
fi

# 1. planning latency at paper config (CEM 300 x 30, horizon 5, history 3, bf16), 50 envs batched,
# CUDA graphs per rollout. Each batch size is its own compilation (about a minute at this size).
jsonl="$final/plan_latency.jsonl"
limit 150 "$py" bench/plan_latency.py --config $plan --batch ${batches#* } --iterations $iters --repeats $reps \
  --amp --compile-mode reduce-overhead --json "$jsonl"
echo "[$(elapsed) s]"
# 2. one env, the whole plan as one CUDA graph, the context computed per sample (the fastest
# one-env setting measured so far: docs/benchmarks.md)
limit 90 "$py" bench/plan_latency.py --config $plan --batch ${batches%% *} --iterations $iters --repeats $reps \
  --amp --compile "${graph[@]}" $([ ${#graph[@]} -gt 0 ] && echo --no-share) --json "$jsonl"
echo "[$(elapsed) s]"
[ -n "${collector:-}" ] && wait "$collector"
cat "$work/collect.log" 2>/dev/null

# 3. Push-T at the paper's architecture: training gets what is left after 120 s of evaluation
# and 75 s of start-up (compilation) and export; its cosine schedule is as long as about 10
# steps/s fit in that time (an eager run on an H200 made 8.6 with its data loaders)
left=$(( BUDGET - $(elapsed) - 120 - 75 ))
minutes=$("$py" -c "print(round(max(0.5, min(${MINUTES:-4.5}, $left / 60)), 2))")
steps=$("$py" -c "print(int($minutes * 60 * 10))")
[ -n "${QUICK:-}" ] && minutes=1 steps=20
echo "[$(elapsed) s] training for at most $minutes min, a schedule of $steps steps"
OUT="$work" EPISODES=$episodes RES=$res MINUTES=$minutes STEPS=$steps bash bench/pusht_gpu.sh
for f in plan.json probe.json plan_deadline.json; do [ -f "$work/$f" ] && cp "$work/$f" "$final/"; done
tar -czf "$final/logs.tgz" -C "$work" . && echo "done in $(elapsed) s"
