#!/usr/bin/env bash
# The wheels that benchmarks/gpu_rows.sh needs and the `device` tool's GPU image lacks, into
# .device-wheels/ (git-ignored), for that image's Python (3.12, x86_64 Linux). The GPU machine
# reaches no package index: the wheels travel with the working tree (`carry`), ~10 MB.
#
#     bash benchmarks/device_wheels.sh          # here, once (needs a package index)
#
# The image already holds torch, numpy, rich, fsspec, pyyaml, msgpack, pandas, matplotlib,
# cloudpickle and psutil (../.library/device/KINDS.md); the learner and replay benchmarks import
# only these besides. The versions are the ones this project's CI resolved and passed with on
# 2026-12-07 (its install pins lower bounds only).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --dest .device-wheels --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
    gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2
ls .device-wheels
