"""Where the carved FFN's time goes on a GPU, and which forward variant is fastest (a lent H100/H200).

    python3 -m bench.cuda_variants [--tokens 8192] [--configs S1A1E8] [--out DIR]

A Llama-2-7B-shaped FFN (hidden 4096, intermediate 11008, random weights), bfloat16. For each config:
the profiler's kernel table of the current forward, then the dense FFN, the pieces (shared part, the two
grouped GEMMs) and forward variants timed side by side (CUDA events, medians), each variant checked
against the current forward. Prints a table last. Runs on the CPU too (small shapes) to check the script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import cmoe
from cmoe.moe.kernels import ACTIVATION_CODES, triton_kernels
from cmoe.moe.ffn import hidden_activation
from cmoe.moe.router import group_slots
from cmoe.tools.bench import cuda_graph as graphed, interleaved_medians
from bench.fixtures import random_ffn_pair

moe_triton = triton_kernels()  # None where Triton is not installed


def median_ms(fn, repeats: int = 30, warmup: int = 5) -> float:
    """The house timer (`interleaved_medians`) on one callable, in milliseconds."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return 1e3 * interleaved_medians({"fn": fn}, repeats, warmup, device)["fn"]


def routed_inputs(moe, x):
    probs, chosen = moe.router.select(x)
    flat = chosen.reshape(-1)
    order, counts = group_slots(flat, moe.experts.num_experts, counting=False)
    return probs, chosen, flat, order, counts


def previous_forward(moe, x):
    """The forward as it was before 2026-11-23 (gates on output rows, un-permute by gather, slots grouped by
    a sort), for comparison."""
    out = moe.shared(x)
    probs, chosen, flat, order, counts = routed_inputs(moe, x)
    gates = moe.router.gates(probs, chosen).to(x.dtype)
    tokens, top_k = chosen.shape
    routed_x = x[order // top_k]
    expert_out = moe.experts._grouped(routed_x, counts, flat[order], None)
    expert_out = expert_out * gates.reshape(-1)[order].unsqueeze(-1)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=x.device)
    back = expert_out[position].view(tokens, top_k, -1)
    return out + (back[:, 0] if top_k == 1 else back.sum(dim=1))


ALL_OFF = dict(counting_sort=False, triton_experts=False, triton_shared=False, triton_router=False)


def with_settings(fn, blocks=None, few_blocks=None, **settings):
    """`fn` run with cmoe.moe.GPU's switches set as given (counting_sort, triton_experts, ...; the others off) and with
    `blocks` and `few_blocks` as the Triton kernels' tile shapes (BLOCKS, FEW_SLOTS_BLOCKS), also while a CUDA
    graph captures it."""

    def run():
        saved_blocks = (moe_triton.BLOCKS, moe_triton.FEW_SLOTS_BLOCKS) if moe_triton else None
        try:
            if blocks:
                moe_triton.BLOCKS = blocks
            if few_blocks:
                moe_triton.FEW_SLOTS_BLOCKS = few_blocks
            with cmoe.moe.GPU.switched(**{**ALL_OFF, **settings}):
                return fn()
        finally:
            if moe_triton:
                moe_triton.BLOCKS, moe_triton.FEW_SLOTS_BLOCKS = saved_blocks
    return run


# Triton tile shapes to try beside moe_triton.BLOCKS: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
# and for decode (FEW_SLOTS_BLOCKS): narrower column tiles give one token's product more programs
TRITON_FEW_BLOCKS = {
    "16x32x128 w4 s4": {"gate_up": (16, 32, 128, 4, 4), "down": (16, 32, 128, 4, 4)},
    "16x64x64 w4 s6": {"gate_up": (16, 64, 64, 4, 6), "down": (16, 64, 64, 4, 6)},
}
TRITON_BLOCKS = {
    "64x128x64 w4 s4": {"gate_up": (64, 128, 64, 4, 4), "down": (64, 128, 64, 4, 4)},
    "128x64x64 w4 s4": {"gate_up": (128, 64, 64, 4, 4), "down": (128, 128, 64, 4, 4)},
    "128x128x64 w8 s4, down 128x256": {"gate_up": (128, 128, 64, 8, 4), "down": (128, 256, 64, 8, 3)},
}


def pieces(moe, x):
    """Time each piece of the forward alone."""
    probs, chosen, flat, order, counts = routed_inputs(moe, x)
    routed_x = x[order // chosen.shape[1]]
    offsets = counts.cumsum(0).to(torch.int32)
    e = moe.experts
    projected = F.grouped_mm(routed_x, e.gate_up_proj.transpose(1, 2), offs=offsets)
    hidden = hidden_activation(projected, e.width, e.gated, e.act_fn, None)
    s, r = moe.shared, moe.router
    timed = {
        "shared part (2 GEMMs + act)": with_settings(lambda: s(x)),
        "shared gate_up GEMM": lambda: F.linear(x, s.gate_up_proj),
        "shared part, Triton gate_up+act, cuBLAS down": with_settings(lambda: s(x), triton_shared=True),
        "router select": lambda: moe.router.select(x),
        "router select + argsort + counts": lambda: routed_inputs(moe, x),
        "argsort + counts": lambda: group_slots(flat, e.num_experts, counting=False),
        "counting sort + counts": lambda: group_slots(flat, e.num_experts, counting=True),
        "gather x to expert order": lambda: x[order // chosen.shape[1]],
        "grouped gate_up GEMM": lambda: F.grouped_mm(routed_x, e.gate_up_proj.transpose(1, 2), offs=offsets),
        "act(gate)*up (routed)": lambda: hidden_activation(projected, e.width, e.gated, e.act_fn, None),
        "grouped down GEMM": lambda: F.grouped_mm(hidden, e.down_proj.transpose(1, 2), offs=offsets),
    }
    if moe_triton is not None and x.is_cuda:
        timed["router and grouping, Triton"] = lambda: moe_triton.route(
            x, r.weight, r.bias, r.selection_bias, r.gate_scale, r.top_k, ACTIVATION_CODES[r.act], r.gated,
            write_gates=False)
        timed["routed experts, Triton (gate_up + down)"] = lambda: moe_triton.routed_experts(
            x, order, counts, r.top_k, None, e.gate_up_proj, None, e.down_proj, ACTIVATION_CODES[e.act], e.gated, None)
    return timed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--configs", default="S1A1E8,S2A2E8,S3A3E8")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--out", default=".")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    torch.set_grad_enabled(False)
    for name in args.configs.split(","):
        dense, moe = random_ffn_pair(args.hidden, args.intermediate, cmoe.CarveConfig.from_name(name), dtype, device)
        x = torch.randn(args.tokens, args.hidden, dtype=dtype, device=device)
        reference = previous_forward(moe, x).float()
        if device == "cuda" and args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    moe(x)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            (out_dir / f"profile_{name}.txt").write_text(table)
            print(name, "\n", table, flush=True)
        variants = {"dense FFN": lambda: dense(x), "carved, previous": lambda: previous_forward(moe, x),
                    "carved, current": with_settings(lambda: moe(x)), "carved, default switches": lambda: moe(x)}
        variants["carved, counting sort"] = with_settings(lambda: moe(x), counting_sort=True)
        if moe_triton is not None and device == "cuda":
            variants["carved, Triton"] = with_settings(lambda: moe(x), triton_experts=True)
            variants["carved, Triton, shared part too"] = with_settings(lambda: moe(x), triton_experts=True,
                                                                        triton_shared=True)
            variants["carved, Triton router, grouped GEMMs"] = with_settings(lambda: moe(x), triton_router=True)
            variants["carved, Triton, router too"] = with_settings(lambda: moe(x), triton_experts=True,
                                                                   triton_router=True)
            variants["carved, Triton, router and shared part too"] = with_settings(
                lambda: moe(x), triton_experts=True, triton_router=True, triton_shared=True)
            variants["carved, Triton, counting sort"] = with_settings(lambda: moe(x), triton_experts=True,
                                                                      counting_sort=True)
            for label, blocks in TRITON_BLOCKS.items():
                variants[f"carved, Triton {label}"] = with_settings(lambda: moe(x), triton_experts=True, blocks=blocks)
        if not args.no_compile:
            compiled = torch.compile(moe, fullgraph=True)
            variants["carved, torch.compile"] = lambda: compiled(x)
            variants["carved, counting sort, torch.compile"] = with_settings(lambda: compiled(x),
                                                                              counting_sort=True)
        if device == "cuda":
            for label in list(variants):
                variants[label + ", CUDA graph"] = graphed(variants[label])
        for label, fn in variants.items():
            error = None
            if label.startswith("carved") and "graph" not in label:
                got = fn().float()
                error = ((got - reference).norm() / reference.norm()).item()
            ms = median_ms(fn)
            rows.append(dict(config=name, what=label, ms=ms, rel_error=error))
            print(json.dumps(rows[-1]), flush=True)
        for label, fn in pieces(moe, x).items():
            rows.append(dict(config=name, what="piece: " + label, ms=median_ms(fn)))
            print(json.dumps(rows[-1]), flush=True)
        # decode at batch 1: launch-bound, so also through CUDA graphs
        x1 = torch.randn(1, args.hidden, dtype=dtype, device=device)
        decode = {"decode b1 dense": lambda: dense(x1), "decode b1 carved": with_settings(lambda: moe(x1))}
        if moe_triton is not None and device == "cuda":
            every = dict(triton_experts=True, triton_shared=True, triton_router=True)
            decode["decode b1 carved, Triton"] = with_settings(lambda: moe(x1), triton_experts=True)
            decode["decode b1 carved, Triton everywhere"] = with_settings(lambda: moe(x1), **every)
            for label, few in TRITON_FEW_BLOCKS.items():
                decode[f"decode b1 carved, Triton everywhere {label}"] = with_settings(lambda: moe(x1), few_blocks=few,
                                                                                      **every)
        if device == "cuda":
            for label in list(decode):
                decode[label + ", CUDA graph"] = graphed(decode[label])
        for label, fn in decode.items():
            rows.append(dict(config=name, what=label, ms=median_ms(fn, repeats=100, warmup=10)))
            print(json.dumps(rows[-1]), flush=True)
        del dense, moe
        if device == "cuda":
            torch.cuda.empty_cache()
    (out_dir / "cuda_variants.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name() if device == "cuda"
                                                                else "cpu", torch=torch.__version__,
                                                                tokens=args.tokens, rows=rows), indent=1))
    dense_ms = {r["config"]: r["ms"] for r in rows if r["what"] == "dense FFN"}
    print(f"\n{'config':8} {'what':40} {'ms':>9} {'dense/x':>8} {'rel err':>9}")
    for r in rows:
        ratio = dense_ms[r["config"]] / r["ms"] if not r["what"].startswith("decode") else float("nan")
        err = "" if r.get("rel_error") is None else f"{r['rel_error']:.1e}"
        print(f"{r['config']:8} {r['what']:40} {r['ms']:9.3f} {ratio:8.2f} {err:>9}")


if __name__ == "__main__":
    main()
