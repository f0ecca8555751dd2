"""What a fine-tune trains besides the attention: LoRA (through peft) on every expert, shared and routed, or on a
sparse FFN's own weights; the routers in full; and the selection bias, balanced by load."""

from __future__ import annotations

import warnings

import torch

from cmoe.hf.adapters import adapter_for
from cmoe.moe import CARVED_FFNS, MoEFFN, Router

EXPERT_PARAMETERS = ["shared.gate_up_proj", "shared.down_proj", "experts.gate_up_proj", "experts.down_proj"]


def gate_scales(layer_routers) -> torch.Tensor:
    """Every router's gate scales in one vector (empty for a model with no routers: the static preset's)."""
    return torch.cat([r.gate_scale.detach().clone() for r in layer_routers] or [torch.zeros(0)])


def routers(model) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def attention_projection_names(model) -> list[str]:
    """Leaf names of the linear layers inside the attention modules (q_proj, ..., or c_attn, c_proj)."""
    adapter = adapter_for(model)
    attention = getattr(adapter.layers(model)[0], adapter.attention)
    return sorted({name.rpartition(".")[2] for name, module in attention.named_modules()
                   if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})


def add_lora(model, config):
    """Wrap `model` with peft LoRA (rank and alpha from `config`, a FinetuneConfig) and make the router rows and gate
    scales trainable too."""
    from peft import LoraConfig, get_peft_model

    carved = next(m for m in model.modules() if isinstance(m, CARVED_FFNS))
    if carved.kind == "sparse":
        slot = next(name for name, m in model.named_modules() if m is carved).rpartition(".")[2]
        parameters = [f"{slot}.gate_up_proj", f"{slot}.down_proj"]
    else:
        parameters = [p for p in EXPERT_PARAMETERS if getattr(carved, p.split(".")[0]) is not None]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=attention_projection_names(model), target_parameters=parameters)
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated name; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    for router in routers(peft_model):
        for parameter in router.parameters():  # peft froze them; the method trains them
            parameter.requires_grad_(True)
    return peft_model


def expert_load_imbalance(model, batches) -> float:
    """Mean over layers of max/mean routed load on these batches (1.0 is perfectly even)."""
    layer_routers = routers(model)
    for router in layer_routers:
        router.load_counts.zero_()
        router.count_load = True
    with torch.no_grad():
        for batch in batches:
            model(batch, use_cache=False)
    values = []
    for router in layer_routers:
        router.count_load = False
        load = router.load_counts.float()
        values.append(float(load.max() / load.mean().clamp_min(1e-9)))
    return sum(values) / max(len(values), 1)


def step_selection_bias(layer_routers, speed: float) -> None:
    for router in layer_routers:
        load = router.load_counts.float()
        router.selection_bias += speed * torch.sign(load.mean() - load)
        router.load_counts.zero_()


@torch.no_grad()
def rebalance(model, batches) -> None:
    """Set every router's selection bias afresh, by the training-free balancing pass that carving uses, from
    the router's softmax on `batches`. Training moves the router rows faster than the per-step bias nudges
    follow; this evens the load for the router as it ended up."""
    from cmoe.core.router_fit import balance_selection_bias

    layers = [m for m in model.modules() if isinstance(m, MoEFFN) and m.router is not None]
    probs = {id(m): [] for m in layers}

    def record(module, args):
        x = args[0].reshape(-1, module.hidden_size)
        probs[id(module)].append(module.router.probabilities(x))

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        for batch in batches:
            model(batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    for m in layers:
        bias = balance_selection_bias(torch.cat(probs[id(m)]), m.router.top_k)
        m.router.selection_bias.copy_(bias.to(m.router.selection_bias))
