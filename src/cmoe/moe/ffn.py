"""The FFN arithmetic every carved FFN shares: activations, the hidden activation from the input projection, and
scalar buffers read on the host once per change."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

# Plain functions for the common activations: a module call costs microseconds, which decode notices.
_FUNCTIONAL = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def activation(name: str):
    """The activation `name` (a key of transformers' ACT2FN) as a plain function where one exists."""
    return _FUNCTIONAL.get(name) or ACT2FN[name]


def hidden_activation(projected: torch.Tensor, width: int, gated: bool, act_fn,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """The FFN hidden activation from the input projection [..., 2W or W]: act(gate) * up, or act(up + bias)."""
    if gated:
        gate, up = projected.split(width, dim=-1)
        hidden = act_fn(gate)
        # in place when nothing needs the product's inputs: one [T, W] allocation fewer
        return hidden * up if torch.is_grad_enabled() else hidden.mul_(up)
    return act_fn(projected if bias is None else projected + bias)


def row_hidden_activation(projected: torch.Tensor, width: int, gated: bool, act_fn,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """`hidden_activation` for one token [2W or W], in place: slicing a vector is cheaper than `split`."""
    if gated:
        return act_fn(projected[:width]).mul_(projected[width:])
    return act_fn(projected if bias is None else projected.add_(bias))


def buffer_floats(owner: nn.Module, *names: str) -> tuple[float, ...]:
    """`owner`'s named scalar buffers as Python floats, read from the device once per change: cached per
    (storage, in-place version), since decode reads them every step."""
    tensors = [owner._buffers[name] for name in names]
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    caches = owner.__dict__.setdefault("_buffer_floats", {})
    cached = caches.get(names)
    if cached is None or cached[0] != key:
        cached = caches[names] = (key, tuple(float(t) for t in tensors))
    return cached[1]
