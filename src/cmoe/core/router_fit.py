"""Building the router analytically, and a training-free load-balancing pass for its selection bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmoe.hf.adapters import FFNWeights
from cmoe.moe.module import Router


def router_rows(ffn: FFNWeights, representatives: torch.Tensor, normalise: bool):
    """Router weight rows ([gate rows; up rows] of the representative neurons) and bias (plain FFNs)."""
    up = ffn.up[representatives]
    rows = up if ffn.gate is None else torch.cat([ffn.gate[representatives], up])
    if normalise:
        rows = F.normalize(rows.float(), dim=-1).to(rows.dtype)
    bias = None if ffn.up_bias is None else ffn.up_bias[representatives]
    return rows, bias


def expert_load(probs: torch.Tensor, bias: torch.Tensor, top_k: int) -> torch.Tensor:
    """Fraction of routed token slots each expert receives: float [E], sums to 1."""
    chosen = (probs + bias).topk(top_k, dim=-1).indices
    counts = torch.bincount(chosen.reshape(-1), minlength=probs.shape[-1]).float()
    return counts / counts.sum()


def imbalance(load: torch.Tensor) -> float:
    """Max load over mean load: 1.0 is perfectly balanced."""
    return float(load.max() / load.mean())


def balance_selection_bias(probs: torch.Tensor, top_k: int, steps: int = 300, patience: int = 40) -> torch.Tensor:
    """A per-expert bias that evens out the load on these tokens, DeepSeek-V3 style, without training.

    Each step nudges overloaded experts' bias down and underloaded ones' up by a shrinking step; the
    bias with the smallest max/mean load seen is kept. It stops after `steps`, or once `patience` steps
    in a row found nothing better. probs: [T, E] router softmax on calibration tokens.
    """
    num_experts = probs.shape[-1]
    bias = torch.zeros(num_experts, device=probs.device)
    best, best_imbalance, since_best = bias.clone(), float("inf"), 0
    step = 1.0 / num_experts
    for _ in range(steps):
        load = expert_load(probs, bias, top_k)
        score = imbalance(load)
        if score < best_imbalance:
            best, best_imbalance, since_best = bias.clone(), score, 0
        elif (since_best := since_best + 1) >= patience:
            break
        bias -= step * torch.sign(load - 1.0 / num_experts)
        step *= 0.97
    return best


def fill_router(router: Router, ffn: FFNWeights, representatives: torch.Tensor, normalise: bool) -> None:
    rows, bias = router_rows(ffn, representatives, normalise)
    router.weight.data.copy_(rows)
    if bias is not None:
        router.bias.data.copy_(bias)
