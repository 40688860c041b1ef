#!/usr/bin/env bash
# Download the wheels that a GPU machine without package access needs for the environments and
# the training CLI (its image has torch, lightning, h5py, PyYAML, but not these), into .whl/.
#   bash bench/gpu_wheels.sh            # here, where pip can reach the registry
# Then copy .whl/ with the repository to the GPU machine; the GPU scripts install it there first
# (bench/gpu_setup.sh: into .whl/site, put on PYTHONPATH).
# PY is the GPU machine's Python version (3.12 in its image).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PY:-3.12}"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  gymnasium==1.4.0 farama-notifications==0.0.6 pymunk==7.3.1 cffi==2.1.1 pycparser==3.12 pygame==2.6.1 \
  jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
ls -la .whl
