# Example (what the GPU scripts in bench/ do first):
#   . bench/gpu_setup.sh && limit 60 python3 bench/plan_latency.py --config configs/tworoom_tiny.yaml --batch 1
# Sourced by the GPU scripts in bench/: the wheels in .whl/ (from bench/gpu_wheels.sh, copied to a
# GPU machine without package access) installed once into .whl/site, the repository on PYTHONPATH, and `limit SECONDS CMD...`, which
# runs one stage under its own time limit and reports a stage it had to stop (counting in
# `stage_errors` those that failed rather than ran out of time).
# One clock for a script and the GPU scripts it calls: BUDGET seconds (585 by default, inside a
# 10-minute job limit) from the first of them. A stage never runs past the budget:
# its limit shrinks to what is left, and with under 15 s left it is skipped (and says so).
py="${PYTHON:-python3}"
export GPU_RUN_BEGIN="${GPU_RUN_BEGIN:-$(date +%s)}" BUDGET="${BUDGET:-585}"  # the wheels' install counts too
site="$PWD/.whl/site"
if ls .whl/*.whl >/dev/null 2>&1 && [[ ":${PYTHONPATH:-}:" != *":$site:"* ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
[[ ":${PYTHONPATH:-}:" == *":$PWD:"* ]] || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
elapsed() { echo $(( $(date +%s) - GPU_RUN_BEGIN )); }
limit() {
  local s=$1 left
  shift
  left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 15 ]; then
    echo "stage skipped (${left}s of the ${BUDGET}s budget left): $*"
    return 0
  fi
  [ "$s" -gt "$left" ] && s=$left
  timeout "$s" "$@"
  local code=$?
  if [ "$code" -ne 0 ]; then
    echo "stage stopped (exit $code, limit ${s}s): $*"
    # a stage that failed rather than ran out of time (124, or 137 when killed) is a broken script
    [ "$code" -ne 124 ] && [ "$code" -ne 137 ] && stage_errors=$(( stage_errors + 1 ))
  fi
  return 0
}
stage_errors=0
