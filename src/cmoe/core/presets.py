"""The presets, by name: each a config type and the fields it sets (`PRESETS`), and `CarveConfig(...)`, which builds
the config a preset names (`sparse` with a budget, else `paper`); `CarveConfig.from_name("S3A3E8")` the paper's
layout; `choose_config`, what `cmoe carve`'s options ask for."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import NamedTuple

from cmoe.core import config as types
from cmoe.core.config import ExpertsConfig, SparseConfig, StaticConfig
from cmoe.errors import CMoEError

_NAME = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)


class Preset(NamedTuple):
    kind: type  # its config type
    defaults: dict  # the fields it sets where the user leaves them as None
    by_budget: bool  # meant for --budget: a carve that names no layout takes the default budget


PRESETS: dict[str, Preset] = {
    # The method as the paper describes it. |h| profiled on cosines (unit-length inputs and weight rows): on
    # SmolLM2, real |h| lets a few neurons with large weights take most marks and doubles S1A1E8's perplexity;
    # of k_act 10, 32 and 384, 10 gave the lowest perplexity (BENCHMARKS.md).
    "paper": Preset(ExpertsConfig, {}, by_budget=False),
    # The path the official code takes, kept for honest comparison: one assignment pass, L1 distances,
    # unit-length router rows.
    "reference": Preset(ExpertsConfig, dict(distance="l1", max_iters=1, normalise_router=True, balance=False), False),
    # Finer experts grouped by what neurons add to the output, and a linear router fitted in closed form to each
    # expert's output norm, `active` experts per token on average. The thresholds are set for k_margin fewer
    # routed experts than the budget pays for: other text takes more than the calibration text (SmolLM2: 6-7%
    # more on WikiText-2 test; BENCHMARKS.md).
    "fitted": Preset(ExpertsConfig, dict(activation="contribution", mark_share=0.25, router="linear", dynamic_k=True,
                                         k_margin=0.08, balance=False), by_budget=True),
    "static": Preset(StaticConfig, {}, by_budget=True),
    "sparse": Preset(SparseConfig, {}, by_budget=True),
}
DEFAULT_BUDGET = 0.75  # what a carve that names neither a budget nor a layout gets
FLAGS = dict(complete="--no-complete", balance="--no-balance", k_act="--k-act", slices="--slices")  # `cmoe carve`'s


def make_config(**values) -> types.CarveConfig:
    """The config of the preset `values` names (default: `sparse` with a budget, else `paper`), its other fields
    as given; None leaves a field to the preset. A field the preset's method does not read is refused."""
    preset = values.pop("preset", None) or ("paper" if values.get("budget") is None else "sparse")
    if preset not in PRESETS:
        raise CMoEError(f"Unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
    kind, defaults, _ = PRESETS[preset]
    given = {key: value for key, value in values.items() if value is not None}
    known = {field.name for field in fields(kind)}
    counts = {"shared", "active", "experts"} & given.keys()
    if preset == "sparse" and counts:
        if given.get("budget") is not None and len(counts) < 3:
            raise CMoEError("Give a budget or the expert counts (shared, active, experts), not both; the budget "
                            "lets the preset choose them.")
        raise CMoEError("The sparse preset keeps every neuron and needs a budget, not expert counts; "
                        "give --budget, e.g. --budget 0.5.")
    unknown = sorted(given.keys() - known)
    if unknown:
        named = ", ".join(f"{name} ({FLAGS[name]})" if name in FLAGS else name for name in unknown)
        raise CMoEError(f"The {preset} preset does not read {named}; leave {'it' if len(unknown) == 1 else 'them'} "
                        f"out or choose a preset that does.")
    return kind(**{**defaults, **{k: v for k, v in given.items() if k in known}}, preset=preset)


def config_from_record(values: dict) -> types.CarveConfig:
    """The config a carve record holds (`record["config"]`), its layout filled in; fields that records written
    before the config types hold but the preset's method does not read are left out."""
    kind = PRESETS[values["preset"]].kind if values.get("preset") in PRESETS else None
    if kind is None:
        raise CMoEError(f"The carve record names preset {values.get('preset')!r}, which cmoe does not know.")
    known = {field.name for field in fields(kind)}
    return kind(**{key: value for key, value in values.items() if key in known})


def choose_config(*, budget: float | None = None, layout: str | None = None, shared: int | None = None,
                  active: int | None = None, experts: int | None = None, slices: int | None = None,
                  preset: str | None = None, **options) -> types.CarveConfig:
    """The config `cmoe carve` asks for: a budget (the preset lays it out), a layout in one word (`S3A3E8`) or
    the three counts, never two of them; nothing at all takes DEFAULT_BUDGET where the preset is meant for a
    budget (the default preset is), else the preset's default layout."""
    counts = dict(shared=shared, active=active, experts=experts)
    given = [f"--{name} {value}" for name, value in counts.items() if value is not None]
    if layout and given:
        raise CMoEError(f"--config {layout} and {', '.join(given)} both set the experts; give one or the other.")
    if budget is not None and (layout or given):
        raise CMoEError(f"--budget and {layout and '--config ' + layout or ', '.join(given)} both set the "
                        "experts; give the budget (the preset picks the layout) or the layout.")
    if slices is not None and budget is None:
        raise CMoEError("--slices goes with --budget; give the layout itself with --config otherwise.")
    if slices is not None and slices < 1:
        raise CMoEError(f"--slices must be at least 1, got {slices}.")
    if budget is not None:
        return make_config(budget=budget, slices=slices, preset=preset, **options)
    if layout:
        return from_name(layout, preset=preset, **options)
    if not given and (preset is None or PRESETS.get(preset, PRESETS["sparse"]).by_budget):
        return make_config(budget=DEFAULT_BUDGET, preset=preset, **options)
    return make_config(**counts, preset=preset, **options)


def from_name(name: str, **overrides) -> types.CarveConfig:
    """`CarveConfig.from_name("S2A2E16", preset="reference")`."""
    match = _NAME.match(name.strip())
    if not match:
        raise CMoEError(f"Cannot read expert configuration {name!r}; write it like S3A3E8 (shared, active, experts).")
    shared, active, experts = map(int, match.groups())
    return make_config(shared=shared, active=active, experts=experts, **overrides)


class _ByPreset(type):
    def __call__(cls, **values):
        return make_config(**values)

    def __instancecheck__(cls, instance) -> bool:
        return isinstance(instance, types.CarveConfig)


class CarveConfig(metaclass=_ByPreset):
    """`CarveConfig(shared=3, active=3, experts=8)`, `CarveConfig(budget=0.5)`, `CarveConfig(budget=0.5,
    preset="fitted")`: the config type of the preset (`ExpertsConfig`, `StaticConfig`, `SparseConfig`), its fields
    as given and the preset's where left out. Every config type is an instance of it."""

    from_name = staticmethod(from_name)
