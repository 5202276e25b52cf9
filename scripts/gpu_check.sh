#!/usr/bin/env bash
# What mt does on this machine's GPU, as one table, in under 8 minutes on one H100/H200:
#
#   scripts/gpu_check.sh [--multi30k DIR] [--steps 300] [--train-steps 800] [--out runs/gpu_check]
#
# bf16 and fp16 (GradScaler) training throughput of the Multi30k and WMT-base presets, a 1-process
# torchrun (NCCL), the SDPA kernel each attention call runs, and greedy/beam-5 decoding speed; see
# scripts/gpu_check.py for each step. The table is printed and kept in runs/gpu_check/gpu_check.txt.
# Python: .venv when it has a CUDA build of torch, else python3 when it already has torch and mt's
# other dependencies (mt itself runs from this checkout), else `make install` first (needs PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
needs="import torch, sentencepiece, sacrebleu, typer, yaml, tqdm"
python=""
for candidate in .venv/bin/python python3; do
    if "$candidate" -c "$needs; assert torch.cuda.is_available()" 2> /dev/null; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    if [[ " $* " == *" --device cpu "* ]]; then
        python=python3  # a dry run on the CPU: whatever torch python3 has
        [ -x .venv/bin/python ] && python=.venv/bin/python
    else
        echo "gpu_check.sh: no python with a CUDA build of torch and mt's dependencies; installing into .venv" >&2
        make install
        python=.venv/bin/python
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" scripts/gpu_check.py "$@"
