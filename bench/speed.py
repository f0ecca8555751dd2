"""Speed benchmark (issue 4): dense vs carved, side by side in one process, medians of interleaved runs.

    .venv/bin/python -m bench.speed [--device cpu|cuda] [--dtype float32|bfloat16] [--configs S1A1E8,S2A2E8,S3A3E8]

1. SmolLM2-135M-Instruct carved with the paper preset (calibration 4 x 512 WikiText-2 tokens: routing
   only has to be realistic here, not optimal): FFN of the middle layer and the whole model, prefill of
   2,048 tokens and decode at batch 1, 8, 32 (`cmoe bench`'s measurements).
2. A Llama-2-7B-shaped FFN (hidden 4096, intermediate 11008, random weights, random grouping): speed only,
   prefill of 2,048 tokens (8,192 on CUDA) and decode at batch 1.
Writes bench/results/speed_<device>_<dtype>.json (on CUDA with the switches of CMOE_GPU_PATHS appended,
e.g. speed_cuda_bfloat16_triton_experts_triton_router.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

import cmoe
from cmoe.tools.bench import bench_ffn, keep_freed_memory, run_benchmark, shape_of
from bench.fixtures import random_ffn_pair
from cmoe.tools.provenance import device_name, git_commit

RESULTS = Path(os.environ.get("CMOE_RESULTS", Path(__file__).parent / "results"))  # elsewhere on a lent GPU


def smollm2_rows(configs, device, dtype, batches) -> list[dict]:
    from cmoe.data import calibration_tokens
    from cmoe.hf.loading import load_model

    dense, tokenizer = load_model("smollm2", dtype, device)
    calibration = calibration_tokens(tokenizer, "wikitext2", 4, 512, seed=0)
    rows = []
    for name in configs:
        carved, _ = load_model("smollm2", dtype, device)
        carved = cmoe.carve_(carved, cmoe.CarveConfig.from_name(name), calibration, progress=False)
        dense_mb, carved_mb = _weight_megabytes(dense), _weight_megabytes(carved)
        rows.append(dict(model="SmolLM2-135M", config=name, level="model", mode="memory", dense_mb=dense_mb,
                         carved_mb=carved_mb, ratio=carved_mb / dense_mb))
        print(json.dumps(rows[-1]), flush=True)
        for row in run_benchmark(carved.eval(), dense.eval(), batches=batches, seqlen=2048):
            rows.append(dict(model="SmolLM2-135M", config=name, **row))
            print(json.dumps(rows[-1]), flush=True)
        del carved
    return rows


def _weight_megabytes(model) -> float:
    """Parameters and buffers, as held in memory (tied weights counted once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def llama7b_ffn_rows(configs, device, dtype) -> list[dict]:
    rows = []
    prefill = 8192 if device == "cuda" else 2048
    for name in configs:
        dense, moe = random_ffn_pair(4096, 11008, cmoe.CarveConfig.from_name(name), dtype, device)
        shape = shape_of(moe, 11008)
        for graphs in (False, True) if device == "cuda" else (False,):
            for tokens, decode, repeats in ((prefill, False, 5 if device == "cpu" else 20), (1, True, 50)):
                row = bench_ffn(dense, moe, shape, tokens, decode=decode, repeats=repeats, graphs=graphs)
                rows.append(dict(model="Llama-2-7B-shaped FFN (random weights)", config=name, **row))
                print(json.dumps(rows[-1]), flush=True)
        del dense, moe
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--configs", default="S1A1E8,S2A2E8,S3A3E8")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()

    kept = keep_freed_memory()
    dtype = getattr(torch, args.dtype)
    configs = args.configs.split(",")
    rows = [] if args.skip_smollm2 else smollm2_rows(configs, args.device, dtype, [int(b) for b in args.batches.split(",")])
    rows += llama7b_ffn_rows(configs, args.device, dtype)
    report = dict(benchmark="speed", command=" ".join([Path(sys.executable).name] + sys.argv),
                  date=time.strftime("%Y-%m-%d"), device=device_name(args.device), threads=torch.get_num_threads(),
                  dtype=args.dtype, torch=torch.__version__, cmoe=cmoe.__version__, git=git_commit(),
                  freed_memory_kept=kept, gpu_paths=dataclasses.asdict(cmoe.moe.GPU), rows=rows)
    switched_on = [name for name, on in dataclasses.asdict(cmoe.moe.GPU).items() if on]
    suffix = "".join(f"_{name}" for name in switched_on) if args.device == "cuda" else ""
    path = RESULTS / f"speed_{args.device}_{args.dtype}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
