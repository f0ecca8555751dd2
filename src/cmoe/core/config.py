"""`CarveConfig`: everything that decides how a dense FFN is carved into experts."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

from cmoe.errors import CMoEError
from cmoe.moe.spec import ROUTER_KINDS

# What each preset fills in when the user leaves a field as None.
PRESETS: dict[str, dict] = {
    # The method as the paper describes it.
    "paper": dict(
        # |h| profiled on cosines (unit-length inputs and weight rows). Measured on SmolLM2 (4 windows of
        # WikiText-2): real |h| lets a few neurons with large weights take most marks and doubles S1A1E8's
        # perplexity (5,470 vs 2,193); "real" and "contribution" remain available.
        activation="cosine",
        k_act=10,  # of 10, 32 and 384 tried on SmolLM2 S3A3E8, 10 gave the lowest perplexity
        distance="l2",
        max_iters=10,  # k-means rounds of balanced assignment
        normalise_router=False,
        balance=True,
    ),
    # Issue 25's method: finer experts grouped by what neurons add to the output, and a linear router fitted
    # in closed form to each expert's output norm (BENCHMARKS.md, "Carving to a budget"). Meant for --budget.
    "fitted": dict(
        activation="contribution",  # |h| x the norm of the neuron's down column
        mark_share=0.25,  # a token marks the quarter of the neurons that add most to its output
        distance="l2",
        max_iters=10,
        router="linear",
        dynamic_k=True,  # `active` experts per token on average, as many as each token's scores call for
        # the thresholds are set for this share fewer routed experts than the budget pays for: other text
        # takes more than the calibration text (SmolLM2: 6-7% more on WikiText-2 test; BENCHMARKS.md)
        k_margin=0.08,
        normalise_router=False,
        balance=False,
    ),
    # FFN-only structured pruning, the baseline a user would otherwise pick: the neurons whose output varies
    # most over the calibration tokens (FLAP's fluctuation) always on, the rest left out, their mean output
    # folded into a bias. Nothing routed.
    "static": dict(activation="fluctuation", compensate=True, k_act=10, distance="l2", max_iters=0, normalise_router=False,
                   balance=False),
    # Per-token activation sparsity, not experts: every neuron stays, and each token's gate and up read only its
    # largest input channels and down only its largest hidden activations (weighted by the weights' norms),
    # above per-layer thresholds calibrated to the budget, and the mean of what they skip folded into a bias.
    # Meant for --budget.
    "sparse": dict(activation="real", compensate=True, complete=True, k_act=10, distance="l2", max_iters=0, normalise_router=False, balance=False),
    # The path the official code takes, kept for honest comparison.
    "reference": dict(
        activation="cosine",  # |h| profiled with unit-length inputs and weight rows
        k_act=10,
        distance="l1",
        max_iters=1,  # a single assignment pass
        normalise_router=True,  # router rows are unit-length copies of the representative rows
        balance=False,
    ),
}

ACTIVATIONS = ("real", "cosine", "contribution", "fluctuation")
# A budget splits the FFN into up to this many equal slices: fewer where the width has no such divisor, or
# where the router (a row per routed slice) would cost more than ROUTER_SHARE of the dense FFN.
# (never fewer than MIN_SLICES where the width allows: the router of a tiny FFN costs more).
BUDGET_SLICES = 64
ROUTER_SHARE = 0.02
MIN_SLICES = 8

_NAME = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)


@dataclass
class CarveConfig:
    """How to carve: `shared` always-on experts, `active` routed experts per token, `experts` in all.

    `S3A3E8` is `CarveConfig(shared=3, active=3, experts=8)`: 6 of 8 equal slices of the FFN run per token.
    `CarveConfig(budget=0.5)` leaves the layout to the preset (`sparse` unless another is named):
    `fitted` takes the most FFN slices whose compute, router included, fits in half the dense FFN's (`for_ffn`
    fills it in once the FFN is known); `static` keeps `shared` of `experts` slices and leaves the rest out
    (`active` 0); `sparse` keeps one part, the whole FFN (S1A0E1), and sets per-token thresholds.
    Fields left as None take the preset's value.
    """

    shared: int | None = None  # default 3 (with a budget: the preset's layout)
    active: int | None = None  # default 3
    experts: int | None = None  # default 8
    preset: str | None = None  # default: with a budget "sparse", else "paper"
    budget: float | None = None  # share of the dense FFN's multiply-adds a token may use; sets the layout
    slices: int | None = None  # with a budget: split the FFN into up to this many slices (default BUDGET_SLICES)
    activation: str | None = None  # what profiling ranks neurons by: one of ACTIVATIONS
    k_act: int | None = None  # neurons marked per token when profiling
    mark_share: float | None = None  # or: that share of the FFN's neurons marked per token (overrides k_act)
    router: str | None = None  # "representative" (the paper's) or "linear" (fitted)
    compensate: bool | None = None  # fold the left-out neurons' mean output into an output bias
    complete: bool | None = None  # sparse: layers may complete their kept neurons' sums (a neuron-major copy)
    dynamic_k: bool | None = None  # `active` is a mean: each token takes the experts its router scores clear
    mean_active: float | None = None  # dynamic_k with a budget: the mean the budget pays for (set by for_ffn)
    k_margin: float | None = None  # dynamic_k: calibrate for this share fewer experts than mean_active
    distance: str | None = None  # "l2" or "l1" between activation patterns
    max_iters: int | None = None
    normalise_router: bool | None = None
    balance: bool | None = None  # set the selection bias so routed experts get equal load
    balance_steps: int = 300
    seed: int = 0

    def __post_init__(self):
        if self.preset is None:
            self.preset = "paper" if self.budget is None else "sparse"
        if self.preset not in PRESETS:
            raise CMoEError(f"Unknown preset {self.preset!r}; use one of {', '.join(PRESETS)}.")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.router = self.router or "representative"
        self.compensate = bool(self.compensate)
        self.complete = bool(self.complete)
        self.dynamic_k = bool(self.dynamic_k)
        self.k_margin = self.k_margin or 0.0
        if not 0 <= self.k_margin < 1:
            raise CMoEError(f"k_margin must lie in [0, 1), got {self.k_margin}.")
        if self.dynamic_k and self.router != "linear":
            raise CMoEError("A per-token number of experts (dynamic_k) needs the linear router; set router='linear'.")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise CMoEError(f"budget must lie in (0, 1], the share of the dense FFN's compute, got {self.budget}; "
                            "use e.g. --budget 0.5.")
        if self.router not in ROUTER_KINDS:
            raise CMoEError(f"router must be one of {', '.join(ROUTER_KINDS)}, got {self.router!r}.")
        if self.mark_share is not None and not 0 < self.mark_share <= 1:
            raise CMoEError(f"mark_share must lie in (0, 1], got {self.mark_share}.")
        if self.activation not in ACTIVATIONS:
            raise CMoEError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}.")
        if self.activation == "fluctuation" and self.preset != "static":
            raise CMoEError("activation 'fluctuation' ranks neurons over all tokens, which only the static preset does; "
                            "use real, cosine or contribution.")
        if self.distance not in ("l1", "l2"):
            raise CMoEError(f"distance must be 'l1' or 'l2', got {self.distance!r}.")
        counts = (self.shared, self.active, self.experts)
        if self.budget is None:
            self.shared, self.active, self.experts = (default if v is None else v for v, default in zip(counts, (3, 3, 8)))
        elif any(v is None for v in counts) and any(v is not None for v in counts):
            raise CMoEError("Give a budget or the expert counts (shared, active, experts), not both; the budget "
                            "lets the preset choose them.")
        if self.preset == "sparse" and (self.budget is None or (self.shared, self.active, self.experts) not in (
                (None, None, None), (1, 0, 1))):
            raise CMoEError("The sparse preset keeps every neuron and needs a budget, not expert counts; "
                            "give --budget, e.g. --budget 0.5.")
        if self.laid_out:
            self._check_layout()

    def _check_layout(self):
        if self.experts < 1 or self.shared < 0 or self.active < 0:
            raise CMoEError(f"Expert counts must be positive, got {self.name}; use e.g. --shared 3 --active 3 --experts 8.")
        if self.shared + self.active > self.experts:
            raise CMoEError(
                f"{self.name} asks for {self.shared} shared + {self.active} active experts but only {self.experts} exist; "
                "make shared + active at most experts."
            )
        if self.preset == "static" and self.active:
            raise CMoEError(f"The static preset routes nothing, but {self.name} asks for {self.active} active experts; "
                            "give --budget, or --shared and --experts with --active 0.")
        if self.active == 0 and self.shared < self.experts and self.preset not in ("static", "sparse"):
            raise CMoEError(f"{self.name} routes to no expert; set --active to at least 1.")

    @property
    def laid_out(self) -> bool:
        """Whether the expert counts are known (a budget's are filled in by `for_ffn`)."""
        return self.experts is not None

    @property
    def name(self) -> str:
        if self.preset == "sparse":
            return f"sparse{self.budget:g}"
        if not self.laid_out:
            return f"budget {self.budget:g}"
        if self.mean_active is not None:  # experts per token on average
            return f"S{self.shared}A{self.mean_active:.1f}E{self.experts}"
        return f"S{self.shared}A{self.active}E{self.experts}"

    @property
    def dropped(self) -> int:
        """Slices left out altogether (the static preset)."""
        return self.experts - self.shared if self.preset == "static" else 0

    @property
    def routed(self) -> int:
        return self.experts - self.shared - self.dropped

    @property
    def calibrated_k(self) -> float:
        """The mean number of routed experts a dynamic router's threshold is set for on the calibration tokens."""
        return max(1.0, (self.mean_active or self.active) * (1 - self.k_margin))

    @property
    def top_k(self) -> int:
        """The most routed experts a token may take: `active`, or with dynamic_k up to twice that."""
        return min(self.routed, 2 * math.ceil(self.mean_active or self.active)) if self.dynamic_k else self.active

    def for_ffn(self, ffn_width: int, projections: int) -> "CarveConfig":
        """This config with the layout its budget gives for an FFN of `ffn_width` neurons and `projections`
        weight matrices (3 gated, 2 plain); itself when it has no budget."""
        if self.budget is None:
            return self
        if self.preset == "sparse":  # one always-on part, the whole FFN
            return replace(self, shared=1, active=0, experts=1)
        most = min(self.slices or BUDGET_SLICES, max(MIN_SLICES, int(ROUTER_SHARE * projections * ffn_width)))
        slices = max(d for d in range(1, most + 1) if ffn_width % d == 0)
        if self.preset == "static":
            kept = min(slices, max(1, round(self.budget * slices)))
            return replace(self, shared=kept, active=0, experts=slices)
        if self.budget >= 1:
            total = slices
        else:  # the most slices whose cost, router included, fits the budget
            fits = [t for t in range(slices, 0, -1)
                    if t / slices + self.router_cost(slices - t // 4, ffn_width, projections) <= self.budget + 1e-9]
            if not fits:
                cheapest = 1 / slices + self.router_cost(slices, ffn_width, projections)
                raise CMoEError(f"A budget of {self.budget:g} is below the cheapest layout of this {ffn_width}-neuron FFN "
                                f"({cheapest:.3f}: one of {slices} slices and the router); raise --budget.")
            total = fits[0]
        shared = total // 4
        laid_out = replace(self, shared=shared, active=total - shared, experts=slices)
        if self.dynamic_k and total < slices:  # a mean need not be whole: spend the budget the rounding left
            mean = (self.budget - self.router_cost(slices - shared, ffn_width, projections)) * slices - shared
            laid_out.mean_active = round(min(max(mean, laid_out.active), slices - shared), 3)
        return laid_out

    def router_cost(self, routed: int, ffn_width: int, projections: int) -> float:
        """The router's multiply-adds per token over the dense FFN's."""
        rows = routed * (2 if self.router == "representative" and projections == 3 else 1)
        return rows / (projections * ffn_width)

    @property
    def active_fraction(self) -> float:
        return (self.shared + self.active) / self.experts

    @classmethod
    def from_name(cls, name: str, **overrides) -> "CarveConfig":
        """`CarveConfig.from_name("S2A2E16", preset="reference")`."""
        match = _NAME.match(name.strip())
        if not match:
            raise CMoEError(f"Cannot read expert configuration {name!r}; write it like S3A3E8 (shared, active, experts).")
        shared, active, experts = map(int, match.groups())
        return cls(shared=shared, active=active, experts=experts, **overrides)

    def expert_width(self, ffn_width: int) -> int:
        if ffn_width % self.experts:
            raise CMoEError(
                f"The FFN has {ffn_width} neurons, which {self.experts} experts cannot split equally; "
                f"choose an expert count that divides {ffn_width}."
            )
        return ffn_width // self.experts

    def resolved_k_act(self, ffn_width: int) -> int:
        k_act = round(self.mark_share * ffn_width) if self.mark_share is not None else self.k_act
        k_act = min(k_act, ffn_width)  # tiny test models can be narrower than k_act
        if k_act < 1:
            raise CMoEError(f"k_act={k_act} must lie between 1 and the FFN width {ffn_width}.")
        return k_act

    def to_dict(self) -> dict:
        return asdict(self)
