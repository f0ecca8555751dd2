"""The MoE FFN that replaces a dense FFN: always-on shared neurons plus routed experts chosen by a router. With
every expert active and the gate scales at zero, the output equals the dense FFN's up to float rounding.
Which forward runs a call is `cmoe.moe.backends`' choice."""

from __future__ import annotations

import torch
from torch import nn

from cmoe.moe import backends, cost
from cmoe.moe.backends import NO_TRITON, TritonPieces
from cmoe.moe.experts import RoutedExperts, SharedExperts
from cmoe.moe.kernels import ACTIVATION_CODES
from cmoe.moe.router import Router
from cmoe.moe.spec import MoESpec


class MoEFFN(nn.Module):
    """Drop-in replacement for a dense FFN: shared experts + routed experts + (plain FFNs) the output bias."""

    kind = "moe"

    def __init__(self, hidden_size: int, expert_width: int, shared: int, routed: int, top_k: int, act: str,
                 gated: bool, bias: bool, router: str = "representative", output_bias: bool = False):
        super().__init__()
        self.hidden_size, self.act = hidden_size, act
        self.shared = SharedExperts(hidden_size, shared * expert_width, act, gated, bias) if shared else None
        self.router = Router(hidden_size, routed, top_k, act, gated, bias, router) if routed else None
        self.experts = RoutedExperts(hidden_size, routed, expert_width, act, gated, bias) if routed else None
        # the FFN's own output bias, and/or what the carve folds in for the neurons it left out
        self.down_bias = nn.Parameter(torch.zeros(hidden_size)) if bias or output_bias else None

    @classmethod
    def from_spec(cls, spec: MoESpec) -> "MoEFFN":
        """An empty module of this spec."""
        return cls(spec.hidden_size, spec.expert_width, spec.shared, spec.routed, spec.active, spec.act, spec.gated,
                   spec.bias, spec.router, spec.output_bias)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, ffn, shared_neurons: torch.Tensor, routed_neurons: torch.Tensor, top_k: int,
                   router: str = "representative", output_bias: bool = False) -> "MoEFFN":
        """The MoE FFN made of a dense FFN's neurons: `ffn` holds its weights (`cmoe.hf.adapters.FFNWeights`:
        up [I, H], down [H, I], gate [I, H] or None, up_bias, down_bias, act), `shared_neurons` [S * W] the
        always-on neurons, `routed_neurons` [E, W] each routed expert's; `top_k` experts a token. Router rows
        are left at zero (cmoe.core.router_fit fills them), as is the `output_bias` where asked for; on the
        weights' device, in their dtype."""
        width = routed_neurons.shape[1]  # [0, W] where every expert is shared
        moe = cls(ffn.up.shape[1], width, len(shared_neurons) // width, routed_neurons.shape[0], top_k, ffn.act,
                  ffn.gated, ffn.up_bias is not None, router, output_bias)
        moe = moe.to(device=ffn.up.device, dtype=ffn.up.dtype)

        def input_rows(neurons):  # [gate; up] rows of these neurons (up rows alone for a plain FFN)
            rows = ffn.up[neurons]
            return rows if ffn.gate is None else torch.cat([ffn.gate[neurons], rows], dim=-2)

        if moe.shared is not None:
            moe.shared.gate_up_proj.copy_(input_rows(shared_neurons))
            moe.shared.down_proj.copy_(ffn.down[:, shared_neurons])
            if ffn.up_bias is not None:
                moe.shared.up_bias.copy_(ffn.up_bias[shared_neurons])
        if moe.experts is not None:
            moe.experts.gate_up_proj.copy_(torch.stack([input_rows(n) for n in routed_neurons]))
            moe.experts.down_proj.copy_(torch.stack([ffn.down[:, n] for n in routed_neurons]))
            if ffn.up_bias is not None:
                moe.experts.up_bias.copy_(ffn.up_bias[routed_neurons])
        if ffn.down_bias is not None:
            moe.down_bias.copy_(ffn.down_bias)
        return moe

    @property
    def gated(self) -> bool:
        return (self.experts or self.shared).gated

    def layout(self) -> tuple[int, int, int, str]:
        """(neurons per expert, shared experts, routed experts, router kind): what the cost model needs of it."""
        width = self.experts.width if self.experts is not None else self.shared.width
        shared = 0 if self.shared is None else self.shared.width // width
        routed = 0 if self.router is None else self.router.num_experts
        return width, shared, routed, "linear" if self.router is not None and self.router.linear else "representative"

    def weight_dtype(self) -> torch.dtype:
        part = self._modules.get("experts") or self._modules["shared"]
        return part._parameters["down_proj"].dtype

    # The compute count (cmoe.moe.compute): the routers count the experts they choose.

    def start_counting(self) -> None:
        if self.router is not None:
            self.router.load_counts.zero_()
            self.router.count_load = True

    def stop_counting(self) -> None:
        if self.router is not None:
            self.router.count_load = False

    def counted_share(self, dense_width: int, tokens: int) -> float:
        """The share of the dense FFN's multiply-adds it did for `tokens` tokens since `start_counting`."""
        return self.compute_share(dense_width, tokens, 0 if self.router is None else int(self.router.load_counts.sum()))

    def compute_share(self, dense_width: int, tokens: int, slots: int) -> float:
        """Its multiply-adds over the dense FFN's (of `dense_width` neurons) for `tokens` tokens that took `slots`
        (token, routed expert) pairs."""
        if not tokens:
            return float("nan")
        expert_width, shared, routed, router = self.layout()
        fixed = cost.moe_macs(self.hidden_size, expert_width, shared, routed, self.gated, router, 0)
        per_expert = cost.dense_macs(self.hidden_size, expert_width, self.gated)
        return (fixed * tokens + per_expert * slots) / (cost.dense_macs(self.hidden_size, dense_width, self.gated) * tokens)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        return backends.backend_for(self, x).run(self, x).reshape(shape)

    def engine_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] through experts an engine put in place of ours (vLLM's fused MoE), called the way the MoE
        models in transformers call theirs: `experts(x, top_k_index, top_k_weights)`. Our router and shared
        part run here. No host reads and no branches on values, so an engine can compile it: a dynamic router's
        empty slots go to the token's first expert with weight 0."""
        router = self._modules["router"]
        scores = router.scores(x)
        probs, chosen = router.route(scores)
        weights = router.gates(probs, chosen)
        if router.linear:  # the threshold is -inf unless the router is dynamic, and then keeps the slot
            weights = weights * router.kept_slots(scores, chosen)
        out = self.experts(x, chosen, weights)
        if self.shared is not None:
            out = out + self.shared(x)
        return out if self.down_bias is None else out + self.down_bias

    def torch_forward(self, x: torch.Tensor, triton: TritonPieces = NO_TRITON) -> torch.Tensor:
        """The reference forward for x [T, H], in PyTorch operations, with the Triton kernels for the pieces
        `triton` names (the torch backend)."""
        out = torch.zeros_like(x) if self.shared is None else self.shared(x, triton=triton.shared)
        if triton.router is not None:
            router = self.router
            chosen, gates, order, counts = triton.router.route(
                x, router.weight, router.bias, router.selection_bias, router.gate_scale, router.top_k,
                ACTIVATION_CODES[router.act], router.gated, write_gates=not router.gates_are_one())
            out = self.experts(x, chosen, gates, out, grouping=(order, counts), triton=triton.experts)
        elif self.router is not None:
            probs, chosen = self.router.select(x)
            # the check reads gate_scale on the host once per change; torch.compile traces the gates instead
            skip_gates = (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                          and self.router.gates_are_one())
            gates = None if skip_gates else self.router.gates(probs, chosen).to(x.dtype)
            dynamic = self.router.dynamic
            out = self.experts(x, chosen, gates, out, triton=None if dynamic else triton.experts, empty_slots=dynamic)
        if self.down_bias is not None:
            out = out + self.down_bias
        return out

    def decode_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The decode step in PyTorch operations, token by token: the compiled kernel's fallback and reference."""
        out = torch.zeros_like(x) if self.shared is None else torch.empty_like(x)
        for token in range(x.shape[0]):
            row, out_row = x[token], out[token]
            if self.shared is not None:
                self.shared.row_into(out_row, row)
            experts, gates = self.router.choose_row(row)
            self.experts.add_row(out_row, row, experts, gates)
        return out if self.down_bias is None else out + self.down_bias
