"""The router of a carved MoE FFN: scores the routed experts, softmax, top-k; and the grouping of a batch's
(token, expert) slots by expert."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.moe.ffn import activation, buffer_floats, hidden_activation, row_hidden_activation
from cmoe.moe.gpu import GPU


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
        return hidden_activation(F.linear(x, self.weight), self.num_experts, self.gated, self.act_fn, self.bias).abs()

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

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing formula, for scores [..., E]: the softmax (float32) and the top-k experts by softmax plus
        selection bias [..., k]."""
        probs = scores.float().softmax(dim=-1)
        return probs, (probs + self.selection_bias).topk(self.top_k, dim=-1).indices

    def kept_slots(self, scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """A dynamic router's slots [..., k] that a token keeps: its best expert, and those of the others whose
        score clears the threshold."""
        keep = scores.gather(-1, chosen) >= self._buffers["threshold"]
        keep[..., 0] = True
        return keep

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router softmax [T, E] and the chosen experts [T, k] (counted when `count_load` is on)."""
        scores = self.scores(x)
        probs, chosen = self.route(scores)
        if self.dynamic:
            chosen = torch.where(self.kept_slots(scores, chosen), chosen, self.num_experts)
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
            score = row_hidden_activation(torch.mv(self.weight, row), self.num_experts, self.gated, self.act_fn, self.bias).abs_()
        probs, chosen = self.route(score)
        if self.dynamic:
            chosen = chosen[self.kept_slots(score, chosen)]
        if self.gates_are_one():  # training-free: every gate is exactly 1, so skip the product
            return chosen.tolist(), None
        return chosen.tolist(), (1 + probs[chosen] * self.gate_scale[chosen]).to(row.dtype)
