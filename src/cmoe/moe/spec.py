"""What a carved FFN is, typed. A carved model's config.json holds it as its `cmoe` section (with the carve record
beside its fields); `spec_from_dict` reads it back, checked, as the spec of its kind:

    moe     `MoESpec`: shared experts, routed experts and their router (`cmoe.moe.module.MoEFFN`)
    sparse  `SparseSpec`: the whole FFN with per-token activation sparsity (`cmoe.moe.sparse.SparseFFN`)

Sections written before the kinds existed have no `kind`: a `sparse: true` flag marks the sparse ones, whose
FFN weights sit one module deeper (`mlp.shared.*`, see `legacy_sparse`).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import get_type_hints

from transformers.activations import ACT2FN

from cmoe.errors import CMoEError

ROUTER_KINDS = ("representative", "linear")  # see cmoe.moe.router.Router
REDO = "the folder was edited or damaged; carve the model again (or restore the folder)"


def _bad(message: str):
    return CMoEError(f"config.json's cmoe {message}; {REDO}.")


@dataclass(frozen=True)
class MoESpec:
    """The sizes of one carved MoE FFN (every layer of a carved model has the same)."""

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
    kind: str = "moe"

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    @property
    def width(self) -> int:
        """The neurons the carved FFN keeps."""
        return self.experts * self.expert_width

    def check(self) -> None:
        routed = self.experts - self.shared
        if self.hidden_size < 1 or self.expert_width < 1 or self.experts < 1 or not 0 <= self.shared <= self.experts:
            raise _bad(f"section has impossible sizes (hidden_size {self.hidden_size}, expert_width "
                       f"{self.expert_width}, {self.shared} shared of {self.experts} experts)")
        if (routed and not 1 <= self.active <= routed) or (not routed and self.active != 0):
            raise _bad(f"section asks for {self.active} active experts of {routed} routed")
        if self.router not in ROUTER_KINDS:
            raise _bad(f".router {self.router!r} is none of {', '.join(ROUTER_KINDS)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SparseSpec:
    """The sizes of one carved sparse FFN: every neuron kept, per-token thresholds on inputs and neurons."""

    hidden_size: int
    width: int  # neurons
    act: str
    gated: bool
    bias: bool
    output_bias: bool = False  # the mean of what the skipped rows would add, folded into an output bias
    complete: bool = False  # layers may complete their kept neurons' sums (a neuron-major copy of gate and up)
    kind: str = "sparse"

    def check(self) -> None:
        if self.hidden_size < 1 or self.width < 1:
            raise _bad(f"section has impossible sizes (hidden_size {self.hidden_size}, width {self.width})")

    def to_dict(self) -> dict:
        return asdict(self)


SPECS = {"moe": MoESpec, "sparse": SparseSpec}


def legacy_sparse(section: dict) -> bool:
    """Whether a section is a sparse FFN's written before the kinds (an MoE section with `sparse: true`)."""
    return "kind" not in section and section.get("sparse") is True


def _upgraded(section: dict) -> dict:
    """A section written before the kinds, in today's terms (its other keys kept)."""
    if "kind" not in section and not isinstance(section.get("sparse", False), bool):
        raise _bad(f".sparse is {section['sparse']!r}, not bool")
    if not legacy_sparse(section):
        return section
    if section.get("experts") != 1 or section.get("shared") != 1 or section.get("active") != 0:
        raise _bad(f"section marks a sparse FFN (one always-on part) but has {section.get('shared')!r} shared and "
                   f"{section.get('experts', 0)!r} experts")
    width = section.get("expert_width")
    return dict(section, kind="sparse", width=width)


def spec_from_dict(section, hidden_size: int | None = None) -> MoESpec | SparseSpec:
    """The spec a config's `cmoe` section describes (other keys, such as the record, are left), checked first."""
    if not isinstance(section, dict):
        raise CMoEError(f"config.json's cmoe section is {type(section).__name__}, not a table of the FFN; {REDO}.")
    section = _upgraded(section)
    if section.get("complete") is True and section.get("kind", "moe") != "sparse":
        raise _bad("section completes the sums of a sparse FFN but is not sparse")
    cls = SPECS.get(section.get("kind", "moe"))
    if cls is None:
        raise _bad(f".kind {section['kind']!r} is none of {', '.join(SPECS)}")
    defaults = {field.name: field.default for field in fields(cls) if field.default is not MISSING}
    for key, kind in get_type_hints(cls).items():
        value = section.get(key, defaults.get(key))
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _bad(f".{key} is {value!r}, not {kind.__name__}")
    spec = cls(**{field.name: section.get(field.name, defaults.get(field.name)) for field in fields(cls)})
    spec.check()
    if spec.act not in ACT2FN:
        raise _bad(f".act {spec.act!r} is no activation transformers knows")
    if hidden_size is not None and spec.hidden_size != hidden_size:
        raise _bad(f".hidden_size {spec.hidden_size} differs from the model's {hidden_size}")
    return spec
