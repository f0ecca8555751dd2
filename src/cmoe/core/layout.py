"""The layout a budget gives an FFN: how many equal slices, how many of them shared, how many routed per token.
Costs are `cmoe.moe.cost`'s."""

from __future__ import annotations

from cmoe.errors import CMoEError
from cmoe.moe import cost

# A budget splits the FFN into up to this many equal slices: fewer where the width has no such divisor, or
# where the router (a row per routed slice) would cost more than ROUTER_SHARE of the dense FFN
# (never fewer than MIN_SLICES where the width allows: the router of a tiny FFN costs more).
BUDGET_SLICES = 64
ROUTER_SHARE = 0.02
MIN_SLICES = 8


def budget_slices(ffn_width: int, projections: int, most: int | None = None) -> int:
    """The most equal slices (at most `most`, default BUDGET_SLICES) of an FFN whose router stays cheap."""
    most = min(most or BUDGET_SLICES, max(MIN_SLICES, int(ROUTER_SHARE * projections * ffn_width)))
    return max(d for d in range(1, most + 1) if ffn_width % d == 0)


def routed_layout(budget: float, slices: int, ffn_width: int, gated: bool, router: str,
                  dynamic: bool) -> tuple[int, int, float | None]:
    """(shared, active, mean active or None): the most slices whose compute, router included, fits `budget`, a
    quarter of them shared; with a per-token number of experts (`dynamic`), the mean that spends what the rounding
    left."""
    def router_share(routed: int) -> float:
        return cost.router_share(routed, ffn_width, gated, router)

    if budget >= 1:
        total = slices
    else:
        fits = [t for t in range(slices, 0, -1) if t / slices + router_share(slices - t // 4) <= budget + 1e-9]
        if not fits:
            cheapest = 1 / slices + router_share(slices)
            raise CMoEError(f"A budget of {budget:g} is below the cheapest layout of this {ffn_width}-neuron FFN "
                            f"({cheapest:.3f}: one of {slices} slices and the router); raise --budget.")
        total = fits[0]
    shared = total // 4
    active = total - shared
    if not dynamic or total >= slices:
        return shared, active, None
    mean = (budget - router_share(slices - shared)) * slices - shared
    return shared, active, round(min(max(mean, active), slices - shared), 3)


def kept_slices(budget: float, slices: int) -> int:
    """The slices a pruned FFN keeps for `budget` (at least one)."""
    return min(slices, max(1, round(budget * slices)))
