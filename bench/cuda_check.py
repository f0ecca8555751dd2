"""Check the CUDA paths on a GPU machine: carving on cuda, the grouped-GEMM forward in fp32 and bf16, the
Triton kernels' forward in bf16 (eager and under a CUDA graph).

    python -m bench.cuda_check [--skip-compile]   (needs a CUDA GPU; prints one JSON line per check)
"""

import argparse
import json
import time

import torch
import transformers as T

import cmoe
from cmoe.moe.kernels import ACTIVATION_CODES, triton_kernels
from cmoe.moe import GPU, MoEFFN
from cmoe.tools.bench import cuda_graph


def main():
    assert torch.cuda.is_available(), "no CUDA GPU"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile checks (slow)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 256, (4, 64))
    with torch.no_grad():
        dense = model(ids).logits
    started = time.perf_counter()
    moe = cmoe.carve_(model, cmoe.CarveConfig(shared=2, active=6, experts=8), ids, device="cuda", progress=False)
    seconds = time.perf_counter() - started
    moe.to("cuda")
    with torch.no_grad():
        carved = moe(ids.cuda()).logits.cpu()
    print(json.dumps(dict(check="carve on cuda, every expert active == dense (fp32)",
                          max_abs_diff=(carved - dense).abs().max().item(), seconds=round(seconds, 2),
                          device=torch.cuda.get_device_name())))

    for dtype in (torch.float32, torch.bfloat16):
        layer = MoEFFN(hidden_size=512, expert_width=128, shared=1, routed=7, top_k=2, act="silu", gated=True,
                       bias=False)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(std=0.05)
        layer = layer.to("cuda", dtype)
        x = torch.randn(4096, 512, device="cuda", dtype=dtype)
        with torch.no_grad():
            fast = layer(x).float()
            torch.set_grad_enabled(True)
            looped = layer(x).detach().float()  # autograd takes the looped path
            torch.set_grad_enabled(False)
        print(json.dumps(dict(check=f"grouped_mm forward == looped forward ({dtype})",
                              max_abs_diff=(fast - looped).abs().max().item(), scale=looped.abs().max().item())))
        if args.skip_compile:
            continue
        graph_ok = True
        try:
            compiled = torch.compile(layer, fullgraph=True)
            with torch.no_grad():
                compiled(x)
        except Exception as error:  # noqa: BLE001
            graph_ok = f"{type(error).__name__}: {str(error)[:200]}"
        print(json.dumps(dict(check=f"torch.compile(fullgraph=True) ({dtype})", ok=graph_ok)))

    if triton_kernels() is None:
        print(json.dumps(dict(check="Triton kernels", ok="triton is not installed")))
        return
    for case in (dict(top_k=2, act="silu", gated=True, bias=False), dict(top_k=1, act="silu", gated=True, bias=False),
                 dict(top_k=3, act="gelu", gated=False, bias=True)):
        layer = random_layer(**case)
        for tokens in (1, 5, 4096):
            x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                with GPU.switched(triton_experts=False, triton_shared=False, triton_router=False):
                    grouped = layer(x).float()
                # the same routing (the eager router): only the kernels' rounding differs
                with GPU.switched(triton_experts=True, triton_shared=True, triton_router=False):
                    experts_only = layer(x).float()
                # the router's sums and softmax in float32: near-tied tokens may take other experts
                captured = {}
                with GPU.switched(triton_experts=True, triton_shared=True, triton_router=True):
                    every = layer(x)
                    replay = cuda_graph(lambda: captured.__setitem__("out", layer(x)))
                replay()
                chosen, _, order, counts = triton_kernels().route(
                    x, layer.router.weight, layer.router.bias, layer.router.selection_bias, layer.router.gate_scale,
                    layer.router.top_k, ACTIVATION_CODES[case["act"]], case["gated"], write_gates=False)
                eager_chosen = layer.router.select(x)[1]
            print(json.dumps(dict(
                check=f"Triton kernels (bf16, {tokens} tokens, {case})",
                experts_vs_grouped_relative_error=relative(experts_only, grouped),
                all_triton_vs_grouped_relative_error=relative(every.float(), grouped),
                tokens_routed_alike=(chosen.sort(1).values == eager_chosen.sort(1).values).all(1).float().mean().item(),
                grouping_valid=grouping_is_valid(chosen, order, counts),
                graph_replay_equals_eager=torch.equal(captured["out"], every))))


def random_layer(top_k, act, gated, bias):
    torch.manual_seed(0)
    layer = MoEFFN(hidden_size=512, expert_width=128, shared=1, routed=7, top_k=top_k, act=act, gated=gated, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.05)
        layer.router.gate_scale.normal_()  # gates other than 1
    return layer.to("cuda", torch.bfloat16)


def grouping_is_valid(chosen, order, counts):
    """Whether `order` lists every slot once, each expert's slots together, `counts` of them."""
    flat = chosen.reshape(-1)
    expected_counts = torch.bincount(flat, minlength=counts.numel())
    expert_of_place = flat[order.long()]
    return (torch.equal(order.long().sort().values, torch.arange(flat.numel(), device=flat.device))
            and torch.equal(counts.long(), expected_counts)
            and torch.equal(expert_of_place, expert_of_place.sort().values))


def relative(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


if __name__ == "__main__":
    main()
