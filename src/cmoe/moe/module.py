"""The MoE FFN that replaces a dense FFN: always-on shared neurons plus routed experts chosen by a router.

Experts are stacked tensors, `gate_up_proj` [E, 2W, H] (or `up_proj` [E, W, H] for a plain FFN) and
`down_proj` [E, H, W], like the MoE models in transformers v5. With every expert active and the gate
scales at zero, the output equals the dense FFN's up to float rounding.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from cmoe.moe import backends
from cmoe.moe.backends import (  # noqa: F401  (GPU and GPUPaths are part of this module's face)
    CPU_DECODE, CPU_PREFILL, EAGER_DECODE, FEW_SLOTS, GPU, NO_TRITON, GPUPaths, TritonPieces, backend_for, can_group,
    cpu_kernel_call, triton_pieces,
)
from cmoe.moe.kernels import ACTIVATION_CODES
from cmoe.moe.spec import MoESpec


# Plain functions for the common activations: a module call costs microseconds, which decode notices.
_FUNCTIONAL = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def activation(name: str):
    """The activation `name` (a key of transformers' ACT2FN) as a plain function where one exists."""
    return _FUNCTIONAL.get(name) or ACT2FN[name]


def _hidden(projected: torch.Tensor, width: int, gated: bool, act_fn, bias: torch.Tensor | None) -> torch.Tensor:
    """The FFN hidden activation from the input projection: act(gate) * up, or act(up + bias)."""
    if gated:
        gate, up = projected.split(width, dim=-1)
        hidden = act_fn(gate)
        # in place when nothing needs the product's inputs: one [T, W] allocation fewer
        return hidden * up if torch.is_grad_enabled() else hidden.mul_(up)
    return act_fn(projected if bias is None else projected + bias)


def _row_hidden(projected: torch.Tensor, width: int, gated: bool, act_fn, bias: torch.Tensor | None) -> torch.Tensor:
    """`_hidden` for one token [2W or W], in place: slicing a vector is cheaper than `split`."""
    if gated:
        return act_fn(projected[:width]).mul_(projected[width:])
    return act_fn(projected if bias is None else projected.add_(bias))


def buffer_floats(owner: nn.Module, *names: str) -> tuple[float, ...]:
    """`owner`'s named scalar buffers as Python floats, read from the device once per change: cached per
    (storage, in-place version), as `Router.gates_are_one` is, since decode reads them every step."""
    tensors = [owner._buffers[name] for name in names]
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    caches = owner.__dict__.setdefault("_buffer_floats", {})
    cached = caches.get(names)
    if cached is None or cached[0] != key:
        cached = caches[names] = (key, tuple(float(t) for t in tensors))
    return cached[1]


def group_slots(flat: torch.Tensor, num_experts: int, counting: bool | None = None):
    """Order (token, expert) slots by expert, stably, without a host sync: (order, counts), with `order[i]`
    the slot at place i and `counts[e]` the slots of expert e.

    A stable sort, or with `counting` a counting sort: a slot's place is its expert's start plus the number
    of earlier slots of that expert, a running count over a [slots, E] one-hot; a few elementwise kernels
    and one scan rather than a full sort. `counting=None`: per GPU.counting_sort on a GPU, a sort on CPU.
    """
    if counting is None:
        counting = GPU.counting_sort and flat.device.type != "cpu"
    if not counting:
        # group sizes by scatter-add: bincount on CUDA reads the maximum back to the host
        counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        return flat.argsort(stable=True), counts
    running = (flat[:, None] == torch.arange(num_experts, device=flat.device)).cumsum(0)  # [slots, E]
    counts = running[-1] if flat.numel() else torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    earlier_same = running.gather(1, flat[:, None]).squeeze(1) - 1
    place = (counts.cumsum(0) - counts)[flat] + earlier_same
    order = torch.empty_like(place).scatter_(0, place, torch.arange(place.numel(), device=flat.device))
    return order, counts


class Router(nn.Module):
    """Scores the routed experts; softmax; top-k. Two kinds of score:

    representative (the paper's): each expert by one of its neurons, |act(g_r . x) * (u_r . x)|; `weight`
    holds [gate rows; up rows] of the representatives (up rows alone for a plain FFN).
    linear: w_e . x + b_e, a matrix fitted on calibration tokens to each expert's output norm
    (`cmoe.core.router_fit.fit_linear_router`); `weight` [E, H], `bias` [E]. Where its `threshold` is set
    (not -inf), a token takes its best expert and, of the next top_k - 1, those scoring at least the
    threshold: a number of experts per token that follows the token; empty slots of `chosen` hold E.

    `selection_bias` only shifts which experts are chosen (load balancing, DeepSeek-V3 style); the gate
    of a chosen expert is `1 + p * gate_scale`, exactly 1 until `gate_scale` (which starts at 0) is trained.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, act: str, gated: bool, bias: bool,
                 kind: str = "representative"):
        super().__init__()
        self.num_experts, self.top_k, self.gated, self.act = num_experts, top_k, gated, act
        self.linear = kind == "linear"
        if self.linear:
            self.register_buffer("threshold", torch.tensor(float("-inf")))
            # the mean number of experts the threshold was calibrated for: what a step is expected to run
            self.register_buffer("mean_k", torch.tensor(float(top_k)))
        rows = num_experts * (2 if gated and not self.linear else 1)
        self.weight = nn.Parameter(torch.zeros(rows, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias or self.linear else None
        self.gate_scale = nn.Parameter(torch.zeros(num_experts))
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("load_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.count_load = False
        self.act_fn = activation(act)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert's score before the softmax, [T, E] in x's dtype."""
        if self.linear:
            return F.linear(x, self.weight, self.bias)
        return _hidden(F.linear(x, self.weight), self.num_experts, self.gated, self.act_fn, self.bias).abs()

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the scores, float32 [T, E]."""
        return self.scores(x).float().softmax(dim=-1)

    def _threshold_state(self) -> tuple[float, float]:
        """A linear router's (threshold, mean_k) as Python floats, read from the buffers once per change."""
        return buffer_floats(self, "threshold", "mean_k")

    @property
    def dynamic(self) -> bool:
        """Whether the number of experts follows the token (a linear router with its threshold set)."""
        if not self.linear:
            return False
        if torch.compiler.is_compiling():  # traced: compare on the device rather than read a cache
            return bool(self._buffers["threshold"] > float("-inf"))
        return self._threshold_state()[0] > float("-inf")

    def expected_slots(self, tokens: int) -> int:
        """(token, expert) pairs `tokens` tokens are expected to take: for choosing a backend."""
        if self.dynamic:
            return tokens * math.ceil(self._threshold_state()[1])
        return tokens * self.top_k

    def threshold_value(self) -> float:
        return self._threshold_state()[0] if self.linear else float("-inf")

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router softmax [T, E] and the chosen experts [T, k] (counted when `count_load` is on)."""
        scores = self.scores(x)
        probs = scores.float().softmax(dim=-1)
        chosen = (probs + self.selection_bias).topk(self.top_k, dim=-1).indices
        if self.dynamic:
            keep = scores.gather(-1, chosen) >= self._buffers["threshold"]
            keep[:, 0] = True
            chosen = torch.where(keep, chosen, self.num_experts)
        if self.count_load:  # fine-tuning reads how many token slots each expert got, to balance them
            flat = chosen.reshape(-1).detach()
            flat = flat[flat < self.num_experts]
            self.load_counts.scatter_add_(0, flat, torch.ones_like(flat))
        return probs, chosen

    def gates(self, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Each chosen expert's gate, 1 + p * gate_scale: [T, k] (an empty slot's is meaningless)."""
        chosen = chosen.clamp_max(self.num_experts - 1)
        return 1 + probs.gather(-1, chosen) * self.gate_scale[chosen]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs, chosen = self.select(x)
        return self.gates(probs, chosen).to(x.dtype), chosen

    def gates_are_one(self) -> bool:
        """Whether every gate is exactly 1 (gate_scale all 0, as after carving), so the product can be skipped."""
        # cached per (storage, in-place version) of gate_scale, so that decode does not test it every token
        gate_scale = self._parameters["gate_scale"]  # (a dict read: this runs every decode step)
        key = (gate_scale.data_ptr(), gate_scale._version)
        if self.__dict__.get("_gates_key") != key:
            if gate_scale.is_cuda and torch.cuda.is_current_stream_capturing():
                return False  # reading the device while a CUDA graph is captured is not allowed
            self._gates_key, self._gates_one = key, not bool(gate_scale.any())
        return self._gates_one

    def choose_row(self, row: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """Decode on CPU, one token [H]: its chosen experts as Python ints, and their gates (None while all are 1)."""
        if self.linear:
            score = torch.addmv(self.bias, self.weight, row)
        else:
            score = _row_hidden(torch.mv(self.weight, row), self.num_experts, self.gated, self.act_fn, self.bias).abs_()
        probs = score.float().softmax(dim=-1)
        chosen = (probs + self.selection_bias).topk(self.top_k).indices
        if self.dynamic:
            keep = score[chosen] >= self._buffers["threshold"]
            keep[0] = True
            chosen = chosen[keep]
        if self.gates_are_one():  # training-free: every gate is exactly 1, so skip the product
            return chosen.tolist(), None
        return chosen.tolist(), (1 + probs[chosen] * self.gate_scale[chosen]).to(row.dtype)


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
        hidden = _hidden(projected, self.width, self.gated, self.act_fn, bias)
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
            hidden = _row_hidden(torch.mv(self.gate_up_proj[e], row), self.width, self.gated, self.act_fn, bias)
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
            hidden = _hidden(F.linear(part, self.gate_up_proj[e]), self.width, self.gated, self.act_fn, bias)
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
            hidden = _hidden(F.linear(x, self.gate_up_proj), self.width, self.gated, self.act_fn, self.up_bias)
        return F.linear(hidden, self.down_proj)

    def row_into(self, out_row: torch.Tensor, row: torch.Tensor) -> None:
        """Decode on CPU, one token [H]: write the shared part's output into `out_row`."""
        hidden = _row_hidden(torch.mv(self.gate_up_proj, row), self.width, self.gated, self.act_fn, self.up_bias)
        torch.mv(self.down_proj, hidden, out=out_row)


def _ours(experts: nn.Module) -> bool:
    """Whether `experts` is our RoutedExperts, perhaps inside peft's LoRA wrappers (fine-tuning)."""
    base = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts
    return isinstance(base, RoutedExperts)


class MoEFFN(nn.Module):
    """Drop-in replacement for a dense FFN: shared experts + routed experts + (plain FFNs) the output bias."""

    def __init__(self, hidden_size: int, expert_width: int, shared: int, routed: int, top_k: int, act: str,
                 gated: bool, bias: bool, router: str = "representative", output_bias: bool = False,
                 sparse: bool = False, complete: bool = False):
        super().__init__()
        from cmoe.moe.sparse import SparseNeurons

        self.hidden_size, self.sparse = hidden_size, sparse
        if sparse:  # the `sparse` preset's whole FFN
            self.shared = SparseNeurons(hidden_size, shared * expert_width, act, gated, bias, complete)
        else:
            self.shared = SharedExperts(hidden_size, shared * expert_width, act, gated, bias) if shared else None
        self.router = Router(hidden_size, routed, top_k, act, gated, bias, router) if routed else None
        self.experts = RoutedExperts(hidden_size, routed, expert_width, act, gated, bias) if routed else None
        # the FFN's own output bias, and/or what the carve folds in for the neurons it left out
        self.down_bias = nn.Parameter(torch.zeros(hidden_size)) if bias or output_bias else None

    def align_weights(self, alignment: int = 64) -> None:
        """Copy every parameter whose data does not start on a cache line to one that does.

        safetensors loads tensors at their offsets in the file. Misaligned, each vector load of the CPU decode
        step straddles two cache lines, which slows decode (BENCHMARKS.md).
        """
        with torch.no_grad():
            for parameter in self.parameters():
                if parameter.data_ptr() % alignment:
                    parameter.data = parameter.data.clone()  # torch's CPU allocator aligns to 64 bytes

    @classmethod
    @torch.no_grad()
    def from_dense(cls, ffn, shared_neurons: torch.Tensor, routed_neurons: torch.Tensor, top_k: int,
                   router: str = "representative", output_bias: bool = False, sparse: bool = False,
                   complete: bool = False) -> "MoEFFN":
        """The MoE FFN made of a dense FFN's neurons: `ffn` holds its weights (`cmoe.hf.adapters.FFNWeights`:
        up [I, H], down [H, I], gate [I, H] or None, up_bias, down_bias, act), `shared_neurons` [S * W] the
        always-on neurons, `routed_neurons` [E, W] each routed expert's; `top_k` experts a token. Router rows
        are left at zero (cmoe.core.router_fit fills them), as is the `output_bias` where asked for; on the
        weights' device, in their dtype. `sparse`: the whole FFN as `SparseNeurons` (dense until its thresholds
        are set), nothing routed; `complete`: with the neuron-major copy that lets its layers complete sums."""
        width = routed_neurons.shape[1]  # [0, W] where every expert is shared
        moe = cls(ffn.up.shape[1], width, len(shared_neurons) // width, routed_neurons.shape[0], top_k, ffn.act,
                  ffn.gated, ffn.up_bias is not None, router, output_bias, sparse, complete)
        moe = moe.to(device=ffn.up.device, dtype=ffn.up.dtype)
        if sparse:
            moe.shared.fill_from(ffn)
            if ffn.down_bias is not None:
                moe.down_bias.copy_(ffn.down_bias)
            return moe

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

    @classmethod
    def from_spec(cls, spec: "MoESpec | dict") -> "MoEFFN":
        """An empty module of this spec (a `MoESpec`, or a config's `cmoe` section, checked first)."""
        spec = spec if isinstance(spec, MoESpec) else MoESpec.from_dict(spec)
        return cls(spec.hidden_size, spec.expert_width, spec.shared, spec.routed, spec.active, spec.act, spec.gated,
                   spec.bias, spec.router, spec.output_bias, spec.sparse, spec.complete)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        experts = self._modules.get("experts")  # (None where nothing is routed: then a plain attribute)
        if experts is not None and type(experts) is not RoutedExperts and not _ours(experts):
            return self.engine_forward(x).view(shape)  # a serving engine's fused experts in place of ours
        if (self.sparse and x.shape[0] <= FEW_SLOTS and x.device.type == "cpu" and not self.shared.counting
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            # a sparse FFN's CPU decode step reads only the rows it uses (on a GPU the masked forward runs,
            # which needs no host synchronisation)
            return self._decode_sparse(x).view(shape)
        backend = backend_for(self, x)
        if backend is CPU_DECODE or backend is CPU_PREFILL:
            return self.cpu_kernel(backend, x).view(shape)
        if backend is EAGER_DECODE:
            return self._decode_eager(x).view(shape)
        return self.torch_forward(x, triton_pieces(self, x)).reshape(shape)

    def engine_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] through experts an engine put in place of ours (vLLM's fused MoE), called the way the MoE
        models in transformers call theirs: `experts(x, top_k_index, top_k_weights)`. Our router and shared
        part run here. No host reads and no branches on values, so an engine can compile it: a dynamic router's
        empty slots go to the token's first expert with weight 0."""
        router = self._modules["router"]
        scores = router.scores(x)
        probs = scores.float().softmax(dim=-1)
        chosen = (probs + router.selection_bias).topk(router.top_k, dim=-1).indices
        weights = router.gates(probs, chosen)
        if router.linear:  # the threshold is -inf unless the router is dynamic, and then keeps the slot
            keep = scores.gather(-1, chosen) >= router.threshold
            keep[:, 0] = True
            weights = weights * keep
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

    # CPU inference. A decode step in the compiled kernel is short, so the Python around it counts: these read
    # submodules and parameters from nn.Module's dicts (an attribute lookup through nn.Module.__getattr__ costs
    # about half a microsecond, and a step needs some twenty).

    def cpu_kernel(self, backend: str, x: torch.Tensor) -> torch.Tensor:
        """The cpu_decode or cpu_prefill backend on x [T, H] (the decode step takes float32 input to bfloat16
        weights too)."""
        compiled = backends.kernels.moe_cpu()
        modules = self._modules
        shared, router, experts = modules.get("shared"), modules["router"], modules["experts"]
        s = {} if shared is None else shared._parameters
        r, e = router._parameters, experts._parameters
        return cpu_kernel_call(
            compiled.moe_decode if backend is CPU_DECODE else compiled.moe_prefill, x,
            shared_gate_up=s.get("gate_up_proj"), shared_down=s.get("down_proj"), shared_bias=s.get("up_bias"),
            router_weight=r["weight"], router_bias=r.get("bias"), selection_bias=router._buffers["selection_bias"],
            gate_scale=r["gate_scale"], gates_are_one=router.gates_are_one(), gate_up=e["gate_up_proj"],
            up_bias=e.get("up_bias"), down=e["down_proj"], down_bias=self._parameters.get("down_bias"),
            top_k=router.top_k, act=router.act, gated=experts.gated, linear_router=router.linear,
            threshold=router.threshold_value())

    def _decode_sparse(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared.decode(x)
        return out if self.down_bias is None else out + self.down_bias

    def _decode_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The decode step in PyTorch operations: the fallback of the compiled kernel, and its reference."""
        out = torch.zeros_like(x) if self.shared is None else torch.empty_like(x)
        for token in range(x.shape[0]):
            row, out_row = x[token], out[token]
            if self.shared is not None:
                self.shared.row_into(out_row, row)
            experts, gates = self.router.choose_row(row)
            self.experts.add_row(out_row, row, experts, gates)
        return out if self.down_bias is None else out + self.down_bias
