"""Activation statistics: which FFN neurons fire, token by token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .adapters import FFNWeights


def neuron_scores(x: torch.Tensor, ffn: FFNWeights, activation: str) -> torch.Tensor:
    """What profiling ranks neurons by, per token [T, I].

    real: |h|. cosine: |h| with unit-length inputs and weight rows (the official code's profiling).
    contribution: |h| times the length of the neuron's `down` column, i.e. the size of what the neuron adds
    to the FFN output, so that neurons with large h but small output weights do not take the marks.
    """
    h = ffn_hidden(x, ffn, cosine=activation == "cosine").abs_()
    if activation == "contribution":
        h *= ffn.down.float().norm(dim=0)
    return h


def ffn_hidden(x: torch.Tensor, ffn: FFNWeights, cosine: bool = False) -> torch.Tensor:
    """The FFN hidden activation h [T, I] for inputs x [T, H] (the input of `down`).

    With `cosine=True` inputs and weight rows are unit-length first, as the official CMoE code profiles them.
    """
    act = ACT2FN[ffn.act]
    x = x.float()
    up, gate = ffn.up.float(), None if ffn.gate is None else ffn.gate.float()
    if cosine:
        x = F.normalize(x, dim=-1)
        up = F.normalize(up, dim=-1)
        gate = None if gate is None else F.normalize(gate, dim=-1)
    up_bias = None if (cosine or ffn.up_bias is None) else ffn.up_bias.float()
    h_up = F.linear(x, up, up_bias)
    if gate is None:
        return act(h_up)
    return act(F.linear(x, gate)) * h_up


def activation_marks(h: torch.Tensor, k_act: int) -> torch.Tensor:
    """For each token (row), mark the k_act neurons with the largest |h|: bool [T, I]."""
    top = h.abs().topk(k_act, dim=-1).indices
    marks = torch.zeros(h.shape, dtype=torch.bool, device=h.device)
    return marks.scatter_(-1, top, True)


def activation_rate(marks: torch.Tensor) -> torch.Tensor:
    """How often each neuron is marked, over all tokens: float [I]."""
    return marks.float().mean(dim=0)
