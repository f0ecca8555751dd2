"""Activation statistics: which FFN neurons fire, token by token."""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from cmoe.hf.adapters import FFNWeights


def ffn_activations(x: torch.Tensor, ffn: FFNWeights, activation: str = "real") -> tuple[torch.Tensor, torch.Tensor]:
    """For inputs x [T, H]: the FFN hidden activation h [T, I] (the input of `down`) and the scores that
    profiling ranks neurons by [T, I], from one pass of the input projections.

    real: |h|. cosine: |h| with unit-length inputs and weight rows, as the official CMoE code profiles (the
    projections are rescaled rather than recomputed). contribution: |h| times the length of the neuron's
    `down` column, the size of what the neuron adds to the output.
    """
    act = ACT2FN[ffn.act]
    x = x.float()
    up_dot = x @ ffn.up.float().T
    gate_dot = None if ffn.gate is None else x @ ffn.gate.float().T
    up_pre = up_dot if ffn.up_bias is None else up_dot + ffn.up_bias.float()
    hidden = act(up_pre) if gate_dot is None else act(gate_dot) * up_pre
    if activation == "real":
        return hidden, hidden.abs()
    if activation == "contribution":
        return hidden, hidden.abs() * ffn.down.float().norm(dim=0)
    inverse_x = 1.0 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    up_cos = up_dot * inverse_x / ffn.up.float().norm(dim=-1).clamp_min(1e-12)
    if gate_dot is None:  # biases are left out, as with unit-length rows they have no meaning
        return hidden, act(up_cos).abs_()
    gate_cos = gate_dot * inverse_x / ffn.gate.float().norm(dim=-1).clamp_min(1e-12)
    return hidden, (act(gate_cos) * up_cos).abs_()


def fluctuation(hidden: torch.Tensor, ffn: FFNWeights) -> torch.Tensor:
    """FLAP's fluctuation of each neuron over the tokens [I]: the variance of its output, var(h) x |down column|^2.
    A neuron with little of it is well replaced by its mean output."""
    return hidden.var(dim=0) * ffn.down.float().pow(2).sum(dim=0)


def activation_marks(scores: torch.Tensor, k_act: int) -> torch.Tensor:
    """For each token (row), mark the k_act neurons with the largest score: bool [T, I]."""
    top = scores.topk(k_act, dim=-1).indices
    marks = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return marks.scatter_(-1, top, True)


def activation_rate(marks: torch.Tensor) -> torch.Tensor:
    """How often each neuron is marked, over all tokens: float [I]."""
    return marks.float().mean(dim=0)
