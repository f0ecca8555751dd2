#!/usr/bin/env bash
# The GPU measurements (issues 3, 4, 5) as run on a lent H100. Needs SmolLM2 in $CMOE_CACHE (cmoe fetch)
# and the data in $CMOE_DATA_DIR; results go to $CMOE_RESULTS (default bench/results).
#   bench/gpu_session.sh variants   CUDA checks, then where the carved FFN's time goes (bench/cuda_variants.py)
#   bench/gpu_session.sh finetune   recovery fine-tune of S3A3E8 at the paper's budget (2,048 x 2,048 tokens)
#   bench/gpu_session.sh speed      the speed benchmark in bfloat16, eager and under CUDA graphs (default GPU paths)
#   bench/gpu_session.sh triton     the same with every Triton kernel (experts, shared part, router) switched on
#   bench/gpu_session.sh tiles      the Triton kernels' tile shapes, and decode through 32 layers (cuda_tiles.py)
#   bench/gpu_session.sh lease OUT  one short lease's worth (issue 27), most wanted first, each step cut off at
#                                   a shared deadline (CMOE_DEADLINE_S, default 540 s): the CUDA checks, the
#                                   7B-shaped variants at S1A1E8, the 7B-shaped carve (needs the token ids of
#                                   bench/carve_7b.py --write-calibration in .gpu/), the speed benchmark's
#                                   7B-shaped rows with the Triton kernels, the other configs, SmolLM2's shape
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"  # run from the repository root: bench is a package
case "${1:-speed}" in
variants)
    python3 -m bench.cuda_check
    python3 -m bench.cuda_variants --configs S1A1E8,S2A2E8,S3A3E8
    python3 -m bench.cuda_variants --hidden 576 --intermediate 1536 --tokens 2048 --configs S1A1E8 ;;
finetune)
    python3 -m bench.finetune --device cuda --configs S3A3E8 --samples 2048 --batch-size 8 --max-minutes 6 ;;
speed)
    python3 -m bench.speed --device cuda --dtype bfloat16 ;;
triton)
    CMOE_GPU_PATHS=triton_experts,triton_shared,triton_router python3 -m bench.speed --device cuda --dtype bfloat16 ;;
tiles)
    python3 -m bench.cuda_tiles --sweep S1A1E8,S3A3E8 --out "${CMOE_RESULTS:-bench/results}" ;;
lease)
    out="${2:?lease needs an output folder}"; mkdir -p "$out"
    deadline=$((SECONDS + ${CMOE_DEADLINE_S:-540}))
    step() {  # step NAME MAX_SECONDS COMMAND...: run it for at most MAX_SECONDS, never past the deadline
        local name=$1 most=$2; shift 2
        local left=$((deadline - SECONDS)); ((left < most)) && most=$left
        if ((most < 15)); then echo "== $name: skipped, ${left}s left"; return; fi
        echo "== $name (at most ${most}s)"; local started=$SECONDS
        timeout --kill-after=5 "$most" "$@" || echo "== $name: exit $? after $((SECONDS - started))s"
        echo "== $name took $((SECONDS - started))s"
    }
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
    python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" || true
    step check 120 python3 -m bench.cuda_check --skip-compile
    step variants_7b_s1 170 python3 -m bench.cuda_variants --configs S1A1E8 --out "$out/variants_7b_s1"
    step carve_7b 170 python3 -m bench.carve_7b --calibration .gpu/wikitext2_8x2048.pt --out "$out/carve_7b.json"
    step speed_7b_triton 60 env CMOE_RESULTS="$out" CMOE_GPU_PATHS=triton_experts,triton_shared,triton_router \
        python3 -m bench.speed --device cuda --dtype bfloat16 --skip-smollm2
    step variants_7b_s23 150 python3 -m bench.cuda_variants --configs S2A2E8,S3A3E8 --no-compile --out "$out/variants_7b_s23"
    step variants_smollm2 90 python3 -m bench.cuda_variants --hidden 576 --intermediate 1536 --tokens 2048 \
        --configs S1A1E8,S3A3E8 --no-compile --out "$out/variants_smollm2" ;;
esac
