#!/usr/bin/env bash
# Issue #17's GPU rows in one call of the `device` tool, inside its 10-minute limit per command:
#
#     bash benchmarks/device_wheels.sh                                    # here, once
#     device run: command "bash benchmarks/gpu_rows.sh", carry [".device-wheels"], timeout_s 590
#
# On the GPU machine it installs the carried wheels (no index there), then runs, each under its
# own time limit so that one that hangs leaves the others' figures:
#   learner_bf16     learner_throughput.py --device cuda (the CNN in bf16, as `pipeline train` runs it)
#   learner_fp32     the same with --no-bf16
#   learner_compile  the same as learner_bf16 with --compile
#   replay           replay_throughput.py --device cuda
# Each row's output goes to $OUT/<row>.txt (the device tool brings $OUT back; elsewhere
# benchmarks/results/gpu/), the machine to $OUT/machine.txt. Copy the figures into
# benchmarks/results/ with the machine. DEVICE=cpu UPDATES=3 EPISODES=30 runs the same rows on a
# CPU in a minute or two: a check of this script, not a figure.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
device="${DEVICE:-cuda}"
updates="${UPDATES:-200}"
episodes="${EPISODES:-100}"
python="${PYTHON:-python3}"
mkdir -p "$out"
if [ -d .device-wheels ]; then
    "$python" -m pip install --quiet --no-index --no-deps .device-wheels/*.whl || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    git log -1 --format='commit %h %s' 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
    nproc
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

row() {  # row NAME SECONDS SCRIPT ARGS...: one benchmark under a time limit, its output kept
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$python" "$@" > "$out/$name.txt" 2>&1
    local status=$?
    echo "rc=$status" >> "$out/$name.txt"
    tail -n 3 "$out/$name.txt"
}

learner=(benchmarks/learner_throughput.py --device "$device" --batch-size 64 256 --updates "$updates" --rounds 3)
row learner_bf16 120 "${learner[@]}"
row learner_fp32 100 "${learner[@]}" --no-bf16
row learner_compile 200 "${learner[@]}" --compile
row replay 120 benchmarks/replay_throughput.py --device "$device" --episodes "$episodes" --out "$out/replay_throughput.txt"
