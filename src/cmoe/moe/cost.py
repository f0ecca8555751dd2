"""The cost model: multiply-adds per token of a carved FFN, as a share of the dense FFN's. Written once, and used
by planning a layout for a budget (`cmoe.core.config`), the sparse split search (`cmoe.core.sparse`), the counting
while a model runs (`cmoe.moe.compute`) and `cmoe bench`'s ideal ratios.

Every product is an H-long dot product per neuron and weight matrix: a gated FFN has three matrices (gate, up,
down), a plain one two. A routed layout costs its shared neurons, its router's rows and, per (token, expert) slot,
the expert's neurons. A sparse FFN costs, per input channel read, a row of gate and up (2I entries, or I plain);
per neuron read, a row of down (H); and per completed neuron, its gate and up entries of each skipped input.
"""

from __future__ import annotations


def projections(gated: bool) -> int:
    """Weight matrices per neuron: gate, up and down, or up and down."""
    return 3 if gated else 2


def router_rows(routed: int, gated: bool, router: str) -> int:
    """Rows of the router's matrix: a representative router scores by a neuron's gate and up rows."""
    return routed * (2 if gated and router == "representative" else 1)


def dense_macs(hidden: int, width: int, gated: bool) -> int:
    """The dense FFN's multiply-adds per token."""
    return projections(gated) * hidden * width


def moe_macs(hidden: int, expert_width: int, shared: int, routed: int, gated: bool, router: str,
             slots: float) -> float:
    """An MoE layout's multiply-adds per token: shared experts and router always, `slots` routed experts (a mean)."""
    per_expert = dense_macs(hidden, expert_width, gated)
    return shared * per_expert + router_rows(routed, gated, router) * hidden + slots * per_expert


def moe_share(dense_width: int, expert_width: int, shared: int, routed: int, gated: bool, router: str,
              slots: float) -> float:
    """`moe_macs` over the dense FFN's (of `dense_width` neurons); the hidden size cancels."""
    return moe_macs(1, expert_width, shared, routed, gated, router, slots) / dense_macs(1, dense_width, gated)


def router_share(routed: int, dense_width: int, gated: bool, router: str) -> float:
    """The router's multiply-adds over the dense FFN's."""
    return router_rows(routed, gated, router) / dense_macs(1, dense_width, gated)


def sparse_macs(hidden: int, width: int, gated: bool, inputs: float, neurons: float, completed: float) -> float:
    """A sparse FFN's multiply-adds for `inputs` input channels read, `neurons` neurons read and `completed` input
    entries of the kept neurons' completed sums (totals over any number of tokens)."""
    return (projections(gated) - 1) * (width * inputs + completed) + hidden * neurons


def sparse_split_share(inputs: float, neurons: float, complete: bool, gated: bool) -> float:
    """A sparse split's share of the dense FFN: `inputs` of the input channels read, `neurons` of the neurons (a
    completed neuron also reads its gate and up entries of the other inputs)."""
    rest = projections(gated) - 1
    per_neuron = 1 + rest * (1 - inputs) if complete else 1
    return (rest * inputs + neurons * per_neuron) / projections(gated)


def sparse_inputs_for(budget: float, neurons: float, gated: bool) -> float:
    """The input share that, with `neurons` of the neurons (not completed), spends `budget`."""
    return (projections(gated) * budget - neurons) / (projections(gated) - 1)


def sparse_neurons_for(budget: float, inputs: float, gated: bool, complete: bool) -> float:
    """The neuron share that, with `inputs` of the input channels, spends `budget`."""
    rest = projections(gated) - 1
    per_neuron = 1 + rest * (1 - inputs) if complete else 1
    return (projections(gated) * budget - rest * inputs) / per_neuron


def expected_experts_read(routed: int, active: float, tokens: int) -> float:
    """Distinct routed experts a batch of `tokens` decode tokens reads, if each takes `active` at random."""
    if routed == 0:
        return 0.0
    return routed * (1 - (1 - active / routed) ** tokens)
