#!/usr/bin/env bash
# The GPU measurements (issues 3, 4, 5) as run on a lent H100. Needs SmolLM2 in $CMOE_CACHE (cmoe fetch)
# and the data in $CMOE_DATA_DIR; results go to $CMOE_RESULTS (default bench/results).
#   bench/gpu_session.sh variants   CUDA checks, then where the carved FFN's time goes (bench/cuda_variants.py)
#   bench/gpu_session.sh finetune   recovery fine-tune of S3A3E8 at the paper's budget (2,048 x 2,048 tokens)
#   bench/gpu_session.sh speed      the speed benchmark in bfloat16, eager and under CUDA graphs
#   bench/gpu_session.sh triton     the same with the Triton kernels (experts, shared part, router) switched on
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="src:bench${PYTHONPATH:+:$PYTHONPATH}"
case "${1:-speed}" in
variants)
    python3 bench/cuda_check.py
    python3 bench/cuda_variants.py --configs S1A1E8,S2A2E8,S3A3E8
    python3 bench/cuda_variants.py --hidden 576 --intermediate 1536 --tokens 2048 --configs S1A1E8 ;;
finetune)
    python3 bench/finetune.py --device cuda --configs S3A3E8 --samples 2048 --batch-size 8 --max-minutes 6 ;;
speed)
    python3 bench/speed.py --device cuda --dtype bfloat16 ;;
triton)
    CMOE_GPU_PATHS=triton_experts,triton_shared,triton_router python3 bench/speed.py --device cuda --dtype bfloat16 ;;
esac
