# Sourced by the GPU scripts in bench/: the carried wheels (.whl/, from bench/gpu_wheels.sh)
# installed once into /tmp/site, the repository on PYTHONPATH, and `limit SECONDS CMD...`, which
# runs one stage under its own time limit and reports a stage it had to stop.
py="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1 && [[ ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[[ ":${PYTHONPATH:-}:" == *":$PWD:"* ]] || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
limit() { local s=$1; shift; timeout "$s" "$@" || echo "stage stopped (exit $?, limit ${s}s): $*"; }
