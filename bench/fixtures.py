"""The benchmarks' one random-FFN fixture: a dense Llama FFN of any shape and its carved counterpart."""

from __future__ import annotations

import torch
from torch import nn

from cmoe.core.config import SparseConfig
from cmoe.core.presets import CarveConfig


def random_ffn_pair(hidden: int, intermediate: int, config: CarveConfig, dtype=torch.float32, device="cpu", seed: int = 0):
    """A dense Llama FFN with random weights and its carved counterpart (random grouping; speed only)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from cmoe.core.router_fit import fill_router
    from cmoe.hf.adapters import FFNWeights
    from cmoe.moe import MoEFFN

    torch.manual_seed(seed)
    dense = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate)).to(dtype)
    nn.init.normal_(dense.gate_proj.weight, std=hidden ** -0.5)
    nn.init.normal_(dense.up_proj.weight, std=hidden ** -0.5)
    nn.init.normal_(dense.down_proj.weight, std=intermediate ** -0.5)
    ffn = FFNWeights(up=dense.up_proj.weight.data, down=dense.down_proj.weight.data, act="silu",
                     gate=dense.gate_proj.weight.data)
    if isinstance(config, SparseConfig):  # thresholds calibrated on random inputs to the budget, as a carve does
        from cmoe.core.sparse import build_sparse

        sparse = build_sparse(torch.randn(4096, hidden), ffn, config)[0]
        return dense.to(device).eval(), sparse.to(device).eval()
    width = config.expert_width(intermediate)
    order = torch.randperm(intermediate)
    routed = order[config.shared * width:].view(config.routed, width).sort(dim=-1).values
    moe = MoEFFN.from_dense(ffn, order[: config.shared * width], routed, config.top_k, config.router)
    with torch.no_grad():
        if moe.router is not None and moe.router.linear:
            nn.init.normal_(moe.router.weight, std=hidden ** -0.5)
            if config.dynamic_k:  # tokens take `mean_active` experts on average, as a carve calibrates
                from cmoe.core.router_fit import set_threshold

                set_threshold(moe.router, torch.randn(4096, hidden, dtype=dtype), config.calibrated_k)
        elif moe.router is not None:
            fill_router(moe.router, ffn, routed[:, 0], normalise=False)
    return dense.to(device).eval(), moe.to(device).eval()
