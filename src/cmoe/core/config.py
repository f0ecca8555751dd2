"""`CarveConfig`: everything that decides how a dense FFN is carved into experts."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from cmoe.errors import CMoEError

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

ACTIVATIONS = ("real", "cosine", "contribution")

_NAME = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)


@dataclass
class CarveConfig:
    """How to carve: `shared` always-on experts, `active` routed experts per token, `experts` in all.

    `S3A3E8` is `CarveConfig(shared=3, active=3, experts=8)`: 6 of 8 equal slices of the FFN run per token.
    Fields left as None take the preset's value.
    """

    shared: int = 3
    active: int = 3
    experts: int = 8
    preset: str = "paper"
    activation: str | None = None  # what profiling ranks neurons by: "cosine", "real" or "contribution"
    k_act: int | None = None  # neurons marked per token when profiling
    distance: str | None = None  # "l2" or "l1" between activation patterns
    max_iters: int | None = None
    normalise_router: bool | None = None
    balance: bool | None = None  # set the selection bias so routed experts get equal load
    balance_steps: int = 300
    seed: int = 0

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise CMoEError(f"Unknown preset {self.preset!r}; use one of {', '.join(PRESETS)}.")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.experts < 1 or self.shared < 0 or self.active < 0:
            raise CMoEError(f"Expert counts must be positive, got {self.name}; use e.g. --shared 3 --active 3 --experts 8.")
        if self.shared + self.active > self.experts:
            raise CMoEError(
                f"{self.name} asks for {self.shared} shared + {self.active} active experts but only {self.experts} exist; "
                "make shared + active at most experts."
            )
        if self.active == 0 and self.shared < self.experts:
            raise CMoEError(f"{self.name} routes to no expert; set --active to at least 1.")
        if self.activation not in ACTIVATIONS:
            raise CMoEError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}.")
        if self.distance not in ("l1", "l2"):
            raise CMoEError(f"distance must be 'l1' or 'l2', got {self.distance!r}.")

    @property
    def name(self) -> str:
        return f"S{self.shared}A{self.active}E{self.experts}"

    @property
    def routed(self) -> int:
        return self.experts - self.shared

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
        k_act = min(self.k_act, ffn_width)  # tiny test models can be narrower than k_act
        if k_act < 1:
            raise CMoEError(f"k_act={k_act} must lie between 1 and the FFN width {ffn_width}.")
        return k_act

    def to_dict(self) -> dict:
        return asdict(self)
