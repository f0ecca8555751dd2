"""The experts of a carved MoE FFN: the routed experts, stacked like the MoE models in transformers v5
(`gate_up_proj` [E, 2W, H], or [E, W, H] for a plain FFN, and `down_proj` [E, H, W]), and the always-on shared
neurons, one narrower dense FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.moe.ffn import activation, hidden_activation, row_hidden_activation
from cmoe.moe.kernels import ACTIVATION_CODES
from cmoe.moe.router import group_slots

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def can_group(experts, x: torch.Tensor) -> bool:
    """Whether the routed experts' products can run as grouped GEMMs (else one product per expert).

    grouped_mm needs row strides that are multiples of 16 bytes, and bfloat16 on CUDA (torch 2.11) and
    wherever torch.compile traces it (its shape function takes nothing else, torch 2.13); not under autograd.
    """
    size = x.element_size()
    dtype_ok = x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())
    return (_HAS_GROUPED_MM and dtype_ok and not torch.is_grad_enabled()
            and all((n * size) % 16 == 0 for n in (experts.width, x.shape[-1])))


class RoutedExperts(nn.Module):
    """E experts of W neurons each, run on the tokens routed to them."""

    def __init__(self, hidden_size: int, num_experts: int, width: int, act: str, gated: bool, bias: bool):
        super().__init__()
        self.num_experts, self.width, self.gated, self.act = num_experts, width, gated, act
        rows = width * (2 if gated else 1)
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, rows, hidden_size))  # gated: [gate; up]
        self.up_bias = nn.Parameter(torch.zeros(num_experts, width)) if bias else None
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, width))
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor | None, out: torch.Tensor,
                grouping: tuple[torch.Tensor, torch.Tensor] | None = None, triton=None,
                empty_slots: bool = False) -> torch.Tensor:
        """`out` [T, H] plus each token's chosen experts times their gates.

        x [T, H]; chosen [T, k]; gates [T, k], or None when every gate is 1; grouping: the slots grouped by
        expert, (order, counts) as `group_slots` gives them, where the caller has them already; triton: the
        Triton kernels' module where they run the experts (`backends.triton_pieces`); empty_slots: `chosen`
        may hold E for a slot left empty (a dynamic router's). Without autograd `out` may be updated in place:
        use the returned tensor.
        """
        tokens, top_k = chosen.shape
        flat = chosen.reshape(-1)
        if empty_slots:  # the empty slots sort last, into an extra group that is then cut off
            order, counts = group_slots(flat, self.num_experts + 1)
            order, counts = order[: flat.numel() - int(counts[-1])], counts[:-1]
        else:
            order, counts = grouping or group_slots(flat, self.num_experts)  # token slots grouped by expert
        if triton is not None:
            return triton.routed_experts(x, order, counts, top_k, gates, self.gate_up_proj, self.up_bias,
                                         self.down_proj, ACTIVATION_CODES[self.act], self.gated, out)
        order, counts = order.long(), counts.long()
        token_of_slot = order // top_k
        routed_x = x.index_select(0, token_of_slot)  # on CPU much faster than x[token_of_slot]
        # the gate scales an expert's output; down is linear, so scale its hidden rows (W wide, not H)
        slot_gates = None if gates is None else gates.reshape(-1)[order].unsqueeze(-1)
        if can_group(self, x):
            expert_out = self._grouped(routed_x, counts, flat[order], slot_gates)
        else:
            expert_out = self._looped(routed_x, counts, slot_gates)
        in_place = not torch.is_grad_enabled()
        expert_out = expert_out.to(out.dtype)  # under autocast without a shared part, `out` is x's zeros
        if x.device.type == "cpu":  # one scatter-add pass; serial on CPU, so the sums are reproducible
            return out.index_add_(0, token_of_slot, expert_out) if in_place else out.index_add(0, token_of_slot, expert_out)
        # CUDA: index_add would use atomics; put the slots back in token order with one row scatter instead
        back = torch.empty_like(expert_out).index_copy_(0, order, expert_out).view(tokens, top_k, -1)
        back = back[:, 0] if top_k == 1 else back.sum(dim=1)
        return out.add_(back) if in_place else out + back

    def _grouped(self, routed_x, counts, expert_of_slot, slot_gates):
        offsets = counts.cumsum(0).to(torch.int32)
        projected = F.grouped_mm(routed_x, self.gate_up_proj.transpose(1, 2), offs=offsets)
        bias = None if self.up_bias is None else self.up_bias[expert_of_slot]
        hidden = hidden_activation(projected, self.width, self.gated, self.act_fn, bias)
        if slot_gates is not None:
            hidden = hidden.mul_(slot_gates)  # no autograd on this path
        return F.grouped_mm(hidden, self.down_proj.transpose(1, 2), offs=offsets)

    def add_row(self, out_row: torch.Tensor, row: torch.Tensor, experts: list[int], gates) -> None:
        """Decode on CPU, one token: add its chosen experts' outputs to `out_row` [H] in place.

        Reads only those experts' weights, in the fewest operations (a few tokens means per-operation
        overhead dominates): one matrix-vector product in and one fused multiply-add out per expert.
        """
        for slot, e in enumerate(experts):
            bias = None if self.up_bias is None else self.up_bias[e]
            hidden = row_hidden_activation(torch.mv(self.gate_up_proj[e], row), self.width, self.gated, self.act_fn, bias)
            if gates is not None:
                hidden.mul_(gates[slot])  # the gate scales the expert's output; down is linear
            out_row.addmv_(self.down_proj[e], hidden)

    def _looped(self, routed_x, counts, slot_gates):
        # Fallback for autograd, odd widths and old torch: one host sync to learn the group sizes.
        sizes = counts.tolist()
        gate_parts = [None] * len(sizes) if slot_gates is None else slot_gates.split(sizes)
        pieces = []
        for e, (part, part_gates) in enumerate(zip(routed_x.split(sizes), gate_parts)):
            bias = None if self.up_bias is None else self.up_bias[e]
            hidden = hidden_activation(F.linear(part, self.gate_up_proj[e]), self.width, self.gated, self.act_fn, bias)
            pieces.append(F.linear(hidden if part_gates is None else hidden * part_gates, self.down_proj[e]))
        return torch.cat(pieces)


class SharedExperts(nn.Module):
    """The always-on neurons, one dense (narrower) FFN."""

    def __init__(self, hidden_size: int, width: int, act: str, gated: bool, bias: bool):
        super().__init__()
        self.width, self.gated, self.act = width, gated, act
        self.gate_up_proj = nn.Parameter(torch.zeros(width * (2 if gated else 1), hidden_size))
        self.up_bias = nn.Parameter(torch.zeros(width)) if bias else None
        self.down_proj = nn.Parameter(torch.zeros(hidden_size, width))
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor, triton=None) -> torch.Tensor:
        """The shared part's output for x [T, H]; triton: the Triton kernels' module where it runs the first product."""
        if triton is not None:
            hidden = triton.dense_hidden(x, self.gate_up_proj, self.up_bias, ACTIVATION_CODES[self.act], self.gated)
        else:
            hidden = hidden_activation(F.linear(x, self.gate_up_proj), self.width, self.gated, self.act_fn, self.up_bias)
        return F.linear(hidden, self.down_proj)

    def row_into(self, out_row: torch.Tensor, row: torch.Tensor) -> None:
        """Decode on CPU, one token [H]: write the shared part's output into `out_row`."""
        hidden = row_hidden_activation(torch.mv(self.gate_up_proj, row), self.width, self.gated, self.act_fn, self.up_bias)
        torch.mv(self.down_proj, hidden, out=out_row)


def ours(experts: nn.Module) -> bool:
    """Whether `experts` is our RoutedExperts, perhaps inside peft's LoRA wrappers (fine-tuning)."""
    base = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts
    return isinstance(base, RoutedExperts)
