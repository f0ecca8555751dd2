#!/usr/bin/env bash
# The GPU measurements (issues 3, 4, 5) as run on a lent H100: the CUDA checks, the speed benchmark in
# bfloat16, the zero-shot sweep and the recovery fine-tune at the paper's budget (2,048 x 2,048 tokens).
# Needs SmolLM2 in $CMOE_CACHE (cmoe fetch) and the data in $CMOE_DATA_DIR. Usage: bench/gpu_session.sh [speed|rest]
set -euo pipefail
export PYTHONUNBUFFERED=1
if [[ "${1:-speed}" == speed ]]; then
    python3 bench/cuda_check.py
    python3 bench/speed.py --device cuda --dtype bfloat16
else
    python3 bench/finetune.py --device cuda --configs S2A2E8 --samples 2048 --batch-size 8 --max-minutes 4
    python3 bench/zeroshot.py --device cuda --batch-size 64
    python3 bench/finetune.py --device cuda --configs S3A3E8 --samples 2048 --batch-size 8 --max-minutes 4
fi
