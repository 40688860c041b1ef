#!/usr/bin/env bash
# Push-T at the paper's architecture on one GPU, end to end in one command of under 10 minutes:
# data generated on that machine, training, then planning under paper-v3 beside the baselines,
# probing, and planning again toward the budget's deadline. Numbers land in $OUT (or bench/out):
# plan.json, probe.json, plan_deadline.json and the logs.
#   bash bench/gpu_wheels.sh                 # here, once: the wheels the GPU image lacks, in .whl/
#   bash bench/pusht_gpu.sh                  # there, with .whl/ copied along
#   QUICK=1 bash bench/pusht_gpu.sh          # tiny sizes and a few steps, to check it on a CPU
# Knobs (environment variables): EPISODES (2000), RES (224), MINUTES of training (4.5),
# STEPS (4000: the cosine schedule's length; training stops at MINUTES if that comes first),
# LR (2e-4: more than the paper's 5e-5, which is tuned for hours, not minutes), LAMBDA (0.09),
# SCHEDULE (a `lambda_schedule` such as '[[2000, 0.003]]'; none by default), COMPILE (true: worth
# its minute of compilation when training runs for more than about two minutes), SUPERSAMPLE (1: draw
# the frames at that many times RES and box-filter them down, as the reference resizes a large render),
# FRAMES_ON_DEVICE (true: all frames held in GPU memory, 28.3 GiB for 2,000 episodes at 224 px, and
# each batch gathered there, with 2 loader workers handing over rows and actions; false: 12 loader
# workers read the frames from the file, which kept an earlier run at 8.6 steps/s).
# Training stops at MINUTES, before its cosine schedule has decayed, so the BatchNorm statistics
# are re-estimated with the final weights before the export (50 batches: README, "Training").
# Planning, probing and deadline planning run side by side once training is done.
# Each stage has its own time limit inside one BUDGET (585 s, bench/gpu_setup.sh), so a slow stage
# cannot take the results of the others with it: alone, MINUTES up to about 5 leaves the
# evaluation its time (data 35-100 s, compilation about 60 s, evaluation 150 s).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out" data
. bench/gpu_setup.sh  # wheels, PYTHONPATH, limit
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$py" -c "import torch, pymunk, pygame, gymnasium; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

on_device=${FRAMES_ON_DEVICE:-true}
workers=$([ "$on_device" = true ] && echo 2 || echo 12)
if [ -n "${QUICK:-}" ]; then
  config=configs/pusht_tiny.yaml episodes=${EPISODES:-24} res=${RES:-64} minutes=${MINUTES:-1} steps=${STEPS:-20}
  lr=${LR:-1e-3} extra=(--data.num_workers 1 --trainer.limit_val_batches 2)
  plan_extra=(--num-episodes 4 --iterations 2) compile=false
else
  config=configs/pusht.yaml episodes=${EPISODES:-2000} res=${RES:-224} minutes=${MINUTES:-4.5} steps=${STEPS:-4000}
  lr=${LR:-2e-4} extra=(--data.num_workers "$workers" --trainer.limit_val_batches 20 --trainer.check_val_every_n_epoch null
    --trainer.val_check_interval 1000)
  plan_extra=(--amp) compile=${COMPILE:-true}
fi
ss=${SUPERSAMPLE:-1}
data="data/pusht_gpu_${res}_${episodes}$([ "$ss" = 1 ] || echo "_ss$ss").h5"
name="pusht_gpu_${res}"
secs=$("$py" -c "print(int(float('$minutes') * 60))")
max_time=$("$py" -c "s=$secs; print(f'00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}')")

# 1. data: mix-policy episodes of 100 steps, all cores
if [ ! -f "$data" ]; then
  start=$(date +%s)
  limit 150 "$py" -m leworld.data.collect --env pusht --episodes "$episodes" --steps 100 --resolution "$res" \
    --policy mix --seed 0 --supersample "$ss" --out "$data" --quiet 2>&1 | tee "$out/collect.log"
  echo "collect: $(( $(date +%s) - start )) s" | tee -a "$out/collect.log"
fi

# 2. training: the config's architecture; the schedule is STEPS long, the run at most MINUTES
start=$(date +%s)
stamp=$(mktemp); touch "$stamp"  # the model planned below must be newer than this
trap 'rm -f "$stamp"' EXIT
limit $((secs + 90)) "$py" train.py fit --config "$config" --data.path "$data" \
  --data.generate.episodes "$episodes" --data.generate.steps 100 --data.generate.resolution "$res" \
  --data.generate.supersample "$ss" --data.frames_on_device "$on_device" --model.model.image_size "$res" --model.lr "$lr" --model.lambda_sigreg "${LAMBDA:-0.09}" \
  --model.bn_recalibration_batches 50 \
  ${SCHEDULE:+--model.lambda_schedule "$SCHEDULE"} \
  --model.compile "$compile" --trainer.max_steps "$steps" --trainer.max_epochs -1 --trainer.max_time "$max_time" \
  --trainer.enable_progress_bar false --trainer.logger.init_args.name "$name" "${extra[@]}" \
  > "$out/train.log" 2>&1
echo "train: $(( $(date +%s) - start )) s" >> "$out/train.log"
tail -4 "$out/train.log"
run_dir=$(ls -d runs/"$name"/version_* 2>/dev/null | sort -V | tail -1)
[ -n "$run_dir" ] && cp "$run_dir"/events.out.tfevents.* "$out/" 2>/dev/null
if [ -z "$run_dir" ] || [ ! "$run_dir/model/model.safetensors" -nt "$stamp" ]; then
  echo "training exported no model (see $out/train.log): not planning an older one" | tee -a "$out/train.log"
  exit 1
fi
model="$run_dir/model"

# 3. planning under paper-v3 beside the baselines, 4. probing, and 5. planning again, replanning
# after every block toward the budget's deadline (docs/results.md, Push-T): side by side
limit 150 "$py" plan.py --model "$model" --protocol paper-v3 --no-progress --out "$out/plan.json" \
  "${plan_extra[@]}" > "$out/plan.log" 2>&1 &
limit 120 "$py" -m leworld.probe --model "$model" --no-progress --out "$out/probe.json" > "$out/probe.log" 2>&1 &
limit 150 "$py" plan.py --model "$model" --protocol paper-v3 --no-progress --no-baselines \
  --receding-horizon 1 --warm-start --iterations 10 --deadline --out "$out/plan_deadline.json" \
  "${plan_extra[@]}" > "$out/plan_deadline.log" 2>&1 &
wait
tail -12 "$out/plan.log"; tail -8 "$out/probe.log"; tail -8 "$out/plan_deadline.log"
