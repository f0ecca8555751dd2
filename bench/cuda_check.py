"""Check the CUDA paths on a GPU machine: carving on cuda, the grouped-GEMM forward in fp32 and bf16.

    PYTHONPATH=src python bench/cuda_check.py      (needs a CUDA GPU; prints one JSON line per check)
"""

import json
import time

import torch
import transformers as T

import cmoe
from cmoe.moe import MoEFFN


def main():
    assert torch.cuda.is_available(), "no CUDA GPU"
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 256, (4, 64))
    with torch.no_grad():
        dense = model(ids).logits
    started = time.perf_counter()
    moe = cmoe.carve(model, cmoe.CarveConfig(shared=2, active=6, experts=8), ids, device="cuda", progress=False)
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
        graph_ok = True
        try:
            compiled = torch.compile(layer, fullgraph=True)
            with torch.no_grad():
                compiled(x)
        except Exception as error:  # noqa: BLE001
            graph_ok = f"{type(error).__name__}: {str(error)[:200]}"
        print(json.dumps(dict(check=f"torch.compile(fullgraph=True) ({dtype})", ok=graph_ok)))


if __name__ == "__main__":
    main()
