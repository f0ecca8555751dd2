"""How to carve, typed: one small config type per method, each holding only what its builder reads (the table from
type to builder is `cmoe.core.carve.TRANSFORMS`; from preset name to type, `cmoe.core.presets.PRESETS`).

    ExpertsConfig  routed experts: the paper's method (`paper`), the official code's path (`reference`), or finer
                   experts with a fitted router (`fitted`)
    StaticConfig   FFN-only structured pruning (`static`): the neurons that vary most kept, the rest left out
    SparseConfig   per-token activation sparsity (`sparse`): every neuron kept, each token reads its largest rows
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from cmoe.errors import CMoEError
from cmoe.core.layout import budget_slices, kept_slices, routed_layout
from cmoe.moe.spec import ROUTER_KINDS

ACTIVATIONS = ("real", "cosine", "contribution", "fluctuation")
DEFAULT_LAYOUT = (3, 3, 8)  # S3A3E8, the paper's


class CarveConfig:
    """What every config type has: `preset`, `name`, `for_ffn` (the layout its budget gives an FFN), `check_ffn`,
    `to_dict`. Built by preset with `cmoe.core.presets.CarveConfig`, which is the one users call."""

    preset: str
    budget: float | None

    def for_ffn(self, ffn_width: int, projections: int) -> "CarveConfig":
        return self

    def check_ffn(self, ffn_width: int) -> dict:
        """Fail on an FFN of `ffn_width` neurons that this config cannot carve; what the record says of it."""
        return {}

    def to_dict(self) -> dict:
        return asdict(self)

    def _check_budget(self) -> None:
        if self.budget is not None and not 0 < self.budget <= 1:
            raise CMoEError(f"budget must lie in (0, 1], the share of the dense FFN's compute, got {self.budget}; "
                            "use e.g. --budget 0.5.")


def _expert_width(ffn_width: int, experts: int) -> int:
    if ffn_width % experts:
        raise CMoEError(f"The FFN has {ffn_width} neurons, which {experts} experts cannot split equally; "
                        f"choose an expert count that divides {ffn_width}.")
    return ffn_width // experts


@dataclass
class ExpertsConfig(CarveConfig):
    """Routed experts: `shared` always-on experts, `active` routed experts per token, `experts` in all
    (`S3A3E8`: 6 of 8 equal slices run per token); or a `budget` from which `for_ffn` lays them out."""

    shared: int | None = None
    active: int | None = None
    experts: int | None = None
    preset: str = "paper"
    budget: float | None = None  # share of the dense FFN's multiply-adds a token may use; sets the layout
    slices: int | None = None  # with a budget: split the FFN into up to this many slices (default BUDGET_SLICES)
    activation: str = "cosine"  # what profiling ranks neurons by: one of ACTIVATIONS
    k_act: int = 10  # neurons marked per token when profiling
    mark_share: float | None = None  # or: that share of the FFN's neurons marked per token (overrides k_act)
    router: str = "representative"  # "representative" (the paper's) or "linear" (fitted)
    compensate: bool = False  # fold the left-out neurons' mean output into an output bias
    dynamic_k: bool = False  # `active` is a mean: each token takes the experts its router scores clear
    mean_active: float | None = None  # dynamic_k with a budget: the mean the budget pays for (set by for_ffn)
    k_margin: float = 0.0  # dynamic_k: calibrate for this share fewer experts than mean_active
    distance: str = "l2"  # between activation patterns: "l2" or "l1"
    max_iters: int = 10  # k-means rounds of balanced assignment
    normalise_router: bool = False
    balance: bool = True  # set the selection bias so routed experts get equal load
    balance_steps: int = 300
    seed: int = 0

    def __post_init__(self):
        self._check_budget()
        if not 0 <= self.k_margin < 1:
            raise CMoEError(f"k_margin must lie in [0, 1), got {self.k_margin}.")
        if self.dynamic_k and self.router != "linear":
            raise CMoEError("A per-token number of experts (dynamic_k) needs the linear router; set router='linear'.")
        if self.router not in ROUTER_KINDS:
            raise CMoEError(f"router must be one of {', '.join(ROUTER_KINDS)}, got {self.router!r}.")
        if self.mark_share is not None and not 0 < self.mark_share <= 1:
            raise CMoEError(f"mark_share must lie in (0, 1], got {self.mark_share}.")
        if self.activation not in ACTIVATIONS:
            raise CMoEError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}.")
        if self.activation == "fluctuation":
            raise CMoEError("activation 'fluctuation' ranks neurons over all tokens, which only the static preset does; "
                            "use real, cosine or contribution.")
        if self.distance not in ("l1", "l2"):
            raise CMoEError(f"distance must be 'l1' or 'l2', got {self.distance!r}.")
        _fill_layout(self, DEFAULT_LAYOUT)
        if self.laid_out:
            _check_counts(self)
            if self.active == 0 and self.shared < self.experts:
                raise CMoEError(f"{self.name} routes to no expert; set --active to at least 1.")

    @property
    def laid_out(self) -> bool:
        """Whether the expert counts are known (a budget's are filled in by `for_ffn`)."""
        return self.experts is not None

    @property
    def name(self) -> str:
        if not self.laid_out:
            return f"budget {self.budget:g}"
        if self.mean_active is not None:  # experts per token on average
            return f"S{self.shared}A{self.mean_active:.1f}E{self.experts}"
        return f"S{self.shared}A{self.active}E{self.experts}"

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    @property
    def calibrated_k(self) -> float:
        """The mean number of routed experts a dynamic router's threshold is set for on the calibration tokens."""
        return max(1.0, (self.mean_active or self.active) * (1 - self.k_margin))

    @property
    def top_k(self) -> int:
        """The most routed experts a token may take: `active`, or with dynamic_k up to twice that."""
        return min(self.routed, 2 * math.ceil(self.mean_active or self.active)) if self.dynamic_k else self.active

    @property
    def active_fraction(self) -> float:
        return (self.shared + self.active) / self.experts

    def for_ffn(self, ffn_width: int, projections: int) -> "ExpertsConfig":
        """This config with the layout its budget gives an FFN of `ffn_width` neurons and `projections` weight
        matrices (3 gated, 2 plain; `cmoe.core.layout.routed_layout`); itself when it has no budget."""
        if self.budget is None:
            return self
        slices = budget_slices(ffn_width, projections, self.slices)
        shared, active, mean = routed_layout(self.budget, slices, ffn_width, projections == 3, self.router,
                                             self.dynamic_k)
        return replace(self, shared=shared, active=active, experts=slices, mean_active=mean)

    def expert_width(self, ffn_width: int) -> int:
        return _expert_width(ffn_width, self.experts)

    def check_ffn(self, ffn_width: int) -> dict:
        self.expert_width(ffn_width)
        return dict(k_act=self.resolved_k_act(ffn_width))

    def resolved_k_act(self, ffn_width: int) -> int:
        k_act = round(self.mark_share * ffn_width) if self.mark_share is not None else self.k_act
        k_act = min(k_act, ffn_width)  # tiny test models can be narrower than k_act
        if k_act < 1:
            raise CMoEError(f"k_act={k_act} must lie between 1 and the FFN width {ffn_width}.")
        return k_act


@dataclass
class StaticConfig(CarveConfig):
    """FFN-only structured pruning, the baseline a user would otherwise pick: the `shared` of `experts` slices
    whose output varies most over the calibration tokens (FLAP's fluctuation) always on, the rest left out and
    their mean output folded into a bias; or a `budget` from which `for_ffn` lays the slices out."""

    shared: int | None = None
    active: int | None = None  # always 0: nothing is routed (a field so that S2A0E8 reads as the others do)
    experts: int | None = None
    preset: str = "static"
    budget: float | None = None
    slices: int | None = None
    activation: str = "fluctuation"  # what ranks the neurons: fluctuation, or a mean of real/cosine/contribution
    compensate: bool = True
    seed: int = 0

    def __post_init__(self):
        self._check_budget()
        if self.activation not in ACTIVATIONS:
            raise CMoEError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}.")
        _fill_layout(self, (DEFAULT_LAYOUT[0], 0, DEFAULT_LAYOUT[2]))
        if self.laid_out:
            _check_counts(self)
            if self.active:
                raise CMoEError(f"The static preset routes nothing, but {self.name} asks for {self.active} active "
                                "experts; give --budget, or --shared and --experts with --active 0.")

    laid_out = ExpertsConfig.laid_out
    name = ExpertsConfig.name
    mean_active = None
    routed = top_k = 0  # nothing is routed
    router = "representative"

    def for_ffn(self, ffn_width: int, projections: int) -> "StaticConfig":
        if self.budget is None:
            return self
        slices = budget_slices(ffn_width, projections, self.slices)
        return replace(self, shared=kept_slices(self.budget, slices), active=0, experts=slices)

    def expert_width(self, ffn_width: int) -> int:
        return _expert_width(ffn_width, self.experts)

    def check_ffn(self, ffn_width: int) -> dict:
        self.expert_width(ffn_width)
        return {}


@dataclass
class SparseConfig(CarveConfig):
    """Per-token activation sparsity, not experts: every neuron stays, and each token's gate and up read only its
    largest input channels and down only its largest hidden activations (weighted by the weights' norms), above
    per-layer thresholds calibrated to the `budget`, and the mean of what they skip folded into a bias."""

    budget: float | None = None  # required: the share of the dense FFN's multiply-adds a token may use
    preset: str = "sparse"
    compensate: bool = True  # fold the mean of what the skipped rows would add into the output bias
    complete: bool = True  # layers may complete their kept neurons' sums (a neuron-major copy of gate and up)
    seed: int = 0

    def __post_init__(self):
        if self.budget is None:
            raise CMoEError("The sparse preset keeps every neuron and needs a budget, not expert counts; "
                            "give --budget, e.g. --budget 0.5.")
        self._check_budget()

    @property
    def name(self) -> str:
        return f"sparse{self.budget:g}"


def _fill_layout(config, defaults: tuple[int, int, int]) -> None:
    """Without a budget, counts left as None take `defaults`; with one, none may be given (it chooses them)."""
    counts = (config.shared, config.active, config.experts)
    if config.budget is None:
        config.shared, config.active, config.experts = (d if v is None else v for v, d in zip(counts, defaults))
    elif any(v is not None for v in counts) and any(v is None for v in counts):
        raise CMoEError("Give a budget or the expert counts (shared, active, experts), not both; the budget "
                        "lets the preset choose them.")


def _check_counts(config) -> None:
    if config.experts < 1 or config.shared < 0 or config.active < 0:
        raise CMoEError(f"Expert counts must be positive, got {config.name}; use e.g. --shared 3 --active 3 --experts 8.")
    if config.shared + config.active > config.experts:
        raise CMoEError(f"{config.name} asks for {config.shared} shared + {config.active} active experts but only "
                        f"{config.experts} exist; make shared + active at most experts.")
