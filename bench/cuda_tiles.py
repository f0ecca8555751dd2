"""Tile shapes for the Triton expert kernels, and decode through every layer, on a lent GPU (issue 27).

    python3 -m bench.cuda_tiles [--sweep S1A1E8] [--decode S1A1E8,S2A2E8,S3A3E8] [--out DIR]

1. Sweep: a Llama-2-7B-shaped FFN (random weights, bfloat16, 8,192 tokens). The routed experts' two Triton
   launches are timed as a CUDA graph with each candidate tile shape of the gate/up kernel (the down
   kernel's default kept), then of the down kernel; then the whole forward with the best of each against
   the default tiles and the dense FFN, in interleaved rounds.
2. Decode at batch 1 through `--layers` copies of the FFN in turn (each layer's weights read from memory,
   as generation does; one layer run again and again would sit partly in L2), CUDA graphs, dense against
   each forward (grouped path, Triton experts and router, everything in Triton, and decode tile shapes).
Writes DIR/cuda_tiles.json and prints a table last.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

import cmoe
from cmoe.moe.kernels import ACTIVATION_CODES, triton_kernels
from cmoe.moe import GPU
from cmoe.tools.bench import bench_ffn_layers, cuda_graph, shape_of
from bench.fixtures import random_ffn_pair
from bench.cuda_variants import median_ms
from cmoe.tools.provenance import git_commit

GATE_UP = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
           (64, 128, 64, 4, 4), (256, 64, 64, 8, 3), (128, 64, 64, 8, 4)]
DOWN = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3), (128, 256, 32, 8, 4),
        (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 32, 4, 5)]
HIDDEN, INTERMEDIATE, DEVICE = 4096, 11008, "cuda"  # (a CPU check of this script shrinks them)
FEW = [(16, 64, 128, 4, 3), (16, 32, 128, 4, 4), (16, 32, 256, 4, 3), (16, 128, 64, 4, 4)]


def sweep(config: str, tokens: int) -> list[dict]:
    kernels = triton_kernels()
    dense, moe = random_ffn_pair(HIDDEN, INTERMEDIATE, cmoe.CarveConfig.from_name(config), torch.bfloat16, DEVICE)
    x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
    r, e = moe.router, moe.experts
    _, _, order, counts = kernels.route(x, r.weight, r.bias, r.selection_bias, r.gate_scale, r.top_k,
                                        ACTIVATION_CODES[r.act], r.gated, write_gates=False)
    shared_out = moe.shared(x)

    def experts(blocks):
        return kernels.routed_experts(x, order, counts, r.top_k, None, e.gate_up_proj, None, e.down_proj,
                                      ACTIVATION_CODES[e.act], e.gated, shared_out, blocks=blocks)

    reference = experts(None).float()
    rows, default = [], kernels.BLOCKS
    for kernel, candidates in (("gate_up", GATE_UP), ("down", DOWN)):
        for tiles in candidates:
            blocks = {**default, kernel: tiles}
            try:
                error = ((experts(blocks).float() - reference).norm() / reference.norm()).item()
                ms = median_ms(cuda_graph(lambda: experts(blocks)), repeats=50)
            except Exception as failure:  # noqa: BLE001  (a tile shape that does not fit: recorded, skipped)
                error, ms = f"{type(failure).__name__}: {str(failure)[:120]}", float("inf")
            rows.append(dict(config=config, what=f"routed experts, {kernel} {tiles}", kernel=kernel, tiles=tiles,
                             ms=ms, rel_error=error))
            print(json.dumps(rows[-1]), flush=True)
    best = {kernel: min((row for row in rows if row["kernel"] == kernel), key=lambda row: row["ms"])["tiles"]
            for kernel in ("gate_up", "down")}

    def forward(blocks):
        saved = kernels.BLOCKS
        kernels.BLOCKS = blocks
        try:
            with GPU.switched(triton_experts=True, triton_router=True):
                return moe(x)
        finally:
            kernels.BLOCKS = saved

    runs = {"dense FFN": cuda_graph(lambda: dense(x)), "carved, Triton, default tiles": cuda_graph(lambda: forward(default)),
            "carved, Triton, best tiles": cuda_graph(lambda: forward(best))}
    times = {name: [] for name in runs}
    for _ in range(5):  # interleaved rounds, so drift hits all alike
        for name, run in runs.items():
            times[name].append(median_ms(run, repeats=30))
    for name, values in times.items():
        rows.append(dict(config=config, what=name + ", CUDA graph", kernel=None, tiles=best if "best" in name else None,
                         ms=statistics.median(values), rounds=values))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def decode_layers(config: str, layers: int) -> list[dict]:
    kernels = triton_kernels()
    dense, moe = random_ffn_pair(HIDDEN, INTERMEDIATE, cmoe.CarveConfig.from_name(config), torch.bfloat16, DEVICE)
    dense_layers = [dense] + [copy.deepcopy(dense) for _ in range(layers - 1)]
    moe_layers = [moe] + [copy.deepcopy(moe) for _ in range(layers - 1)]
    shape = shape_of(moe, INTERMEDIATE)
    variants = {"grouped path": {}, "Triton experts and router": dict(triton_experts=True, triton_router=True),
                "Triton everywhere": dict(triton_experts=True, triton_router=True, triton_shared=True)}
    for tiles in FEW:
        variants[f"Triton experts and router, few-slot tiles {tiles}"] = dict(triton_experts=True, triton_router=True,
                                                                              few=tiles)
    rows = []
    for label, switches in variants.items():
        switches = dict(switches)
        few = switches.pop("few", None)
        saved = kernels.FEW_SLOTS_BLOCKS
        if few:
            kernels.FEW_SLOTS_BLOCKS = {"gate_up": few, "down": few}
        try:
            # the graphs are captured inside, so the switches hold for their replays
            with GPU.switched(**{**dict(triton_experts=False, triton_shared=False, triton_router=False), **switches}):
                row = bench_ffn_layers(dense_layers, moe_layers, shape, 1, repeats=30, graphs=True)
        except Exception as failure:  # noqa: BLE001
            row = dict(error=f"{type(failure).__name__}: {str(failure)[:120]}")
        finally:
            kernels.FEW_SLOTS_BLOCKS = saved
        rows.append(dict(config=config, what=f"decode b1, {layers} layers in turn, CUDA graph, {label}", **row))
        print(json.dumps(rows[-1]), flush=True)
    del dense_layers, moe_layers
    torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default="S1A1E8", help="configs whose prefill tiles to sweep ('' for none)")
    parser.add_argument("--decode", default="S1A1E8,S2A2E8,S3A3E8", help="configs to decode through every layer")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    assert torch.cuda.is_available() and triton_kernels() is not None, "needs a CUDA GPU and Triton"
    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []

    def save():
        (args.out / "cuda_tiles.json").write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, git=git_commit(), tokens=args.tokens,
            layers=args.layers, rows=rows), indent=1))

    for config in filter(None, args.sweep.split(",")):
        rows += sweep(config, args.tokens)
        save()
    for config in filter(None, args.decode.split(",")):
        rows += decode_layers(config, args.layers)
        save()
    print(f"\n{'config':8} {'what':90} {'ms':>8} {'dense/carved':>12}")
    for row in rows:
        ms = row.get("ms", row.get("carved_ms", float("nan")))
        ratio = row.get("ratio", "")
        print(f"{row['config']:8} {row['what'][:90]:90} {ms:8.3f} {ratio if ratio == '' else f'{ratio:.2f}':>12}")


if __name__ == "__main__":
    main()
