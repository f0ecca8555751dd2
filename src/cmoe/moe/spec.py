"""What a carved MoE FFN is, typed: `MoESpec` is saved as the `cmoe` section of a carved model's config.json
(with the carve record beside its fields) and read back, checked, with `MoESpec.from_dict`."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import get_type_hints

from transformers.activations import ACT2FN

from cmoe.errors import CMoEError

ROUTER_KINDS = ("representative", "linear")  # see cmoe.moe.module.Router
REDO = "the folder was edited or damaged; carve the model again (or restore the folder)"


def check_spec(spec, hidden_size: int | None = None) -> None:
    """Raise CMoEError unless `spec` (a carved config's `cmoe` section) describes an MoE FFN that can exist."""
    if not isinstance(spec, dict):
        raise CMoEError(f"config.json's cmoe section is {type(spec).__name__}, not a table of the experts; {REDO}.")
    defaults = {field.name: field.default for field in fields(MoESpec) if field.default is not MISSING}
    for key, kind in get_type_hints(MoESpec).items():
        value = spec.get(key, defaults.get(key))
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CMoEError(f"config.json's cmoe.{key} is {value!r}, not {kind.__name__}; {REDO}.")
    experts, shared, active = spec["experts"], spec["shared"], spec["active"]
    routed = experts - shared
    if spec["hidden_size"] < 1 or spec["expert_width"] < 1 or experts < 1 or not 0 <= shared <= experts:
        raise CMoEError(f"config.json's cmoe section has impossible sizes (hidden_size {spec['hidden_size']}, expert_width "
                        f"{spec['expert_width']}, {shared} shared of {experts} experts); {REDO}.")
    if (routed and not 1 <= active <= routed) or (not routed and active != 0):
        raise CMoEError(f"config.json's cmoe section asks for {active} active experts of {routed} routed; {REDO}.")
    if spec.get("sparse", False) and (routed or shared != 1):
        raise CMoEError(f"config.json's cmoe section marks a sparse FFN (one always-on part) but has {shared} shared and "
                        f"{routed} routed experts; {REDO}.")
    if spec.get("complete", False) and not spec.get("sparse", False):
        raise CMoEError(f"config.json's cmoe section completes the sums of a sparse FFN but is not sparse; {REDO}.")
    if spec.get("router", "representative") not in ROUTER_KINDS:
        raise CMoEError(f"config.json's cmoe.router {spec['router']!r} is none of {', '.join(ROUTER_KINDS)}; {REDO}.")
    if spec["act"] not in ACT2FN:
        raise CMoEError(f"config.json's cmoe.act {spec['act']!r} is no activation transformers knows; {REDO}.")
    if hidden_size is not None and spec["hidden_size"] != hidden_size:
        raise CMoEError(f"config.json's cmoe.hidden_size {spec['hidden_size']} differs from the model's {hidden_size}; "
                        f"{REDO}.")


@dataclass(frozen=True)
class MoESpec:
    """The sizes of one carved FFN (every layer of a carved model has the same)."""

    hidden_size: int
    expert_width: int  # neurons per expert
    shared: int  # always-on experts
    active: int  # routed experts each token uses
    experts: int  # in all, shared included
    act: str  # the activation's name in transformers' ACT2FN
    gated: bool  # down(act(gate(x)) * up(x)) rather than down(act(up(x) + b))
    bias: bool  # the FFN's projections have biases
    router: str = "representative"  # how experts are scored: one of ROUTER_KINDS (folders before 0.x lack it)
    output_bias: bool = False  # a bias on the output, folded in for neurons the carve left out
    sparse: bool = False  # the `sparse` preset: one always-on part, the whole FFN, with per-token activation sparsity
    complete: bool = False  # sparse: layers may complete their kept neurons' sums (a neuron-major copy of gate and up)

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    @classmethod
    def from_dict(cls, section, hidden_size: int | None = None) -> "MoESpec":
        """The spec in a config's `cmoe` section (other keys, such as the record, are left), checked first."""
        check_spec(section, hidden_size)
        return cls(**{field.name: section[field.name] for field in fields(cls) if field.name in section})

    def to_dict(self) -> dict:
        return asdict(self)
