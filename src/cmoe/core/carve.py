"""`carve_(model, config, calibration)`: turn a dense causal LM into a carved model in place, one layer at a time.

Each config type has its transform (`TRANSFORMS`): `build` carves one FFN from its calibration inputs, `spec`
describes the model's FFNs once every layer is carved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from cmoe.core.calibration import replace_ffns
from cmoe.core.config import CarveConfig, ExpertsConfig, SparseConfig, StaticConfig
from cmoe.core.experts import build_experts, build_static
from cmoe.core.sparse import build_sparse
from cmoe.errors import CMoEError
from cmoe.hf.adapters import FFNWeights, adapter_for
from cmoe.hf.modeling import carved_config, is_carved
from cmoe.hf.loading import source_record
from cmoe.moe.spec import MoESpec, SparseSpec
from cmoe.version import __version__


def experts_spec(model, adapter, config: ExpertsConfig | StaticConfig, first: FFNWeights, layers: list[dict]) -> MoESpec:
    return MoESpec(hidden_size=first.up.shape[1], expert_width=config.expert_width(first.width), shared=config.shared,
                   active=config.top_k, experts=config.shared + config.routed, act=first.act, gated=first.gated,
                   bias=first.up_bias is not None, router=config.router, output_bias=config.compensate)


def sparse_spec(model, adapter, config: SparseConfig, first: FFNWeights, layers: list[dict]) -> SparseSpec:
    """Keeps the neuron-major copies only where some layer completes its sums (else drops them here)."""
    complete = any(layer["completes"] for layer in layers)
    if not complete:
        for layer in adapter.layers(model):
            adapter.ffn_module(layer).drop_completion()
    return SparseSpec(hidden_size=first.up.shape[1], width=first.width, act=first.act, gated=first.gated,
                      bias=first.up_bias is not None, output_bias=config.compensate, complete=complete)


@dataclass(frozen=True)
class Transform:
    build: Callable  # (x [T, H], FFNWeights, config) -> (carved FFN, its record, its output on x)
    spec: Callable  # (model, adapter, config, first FFNWeights, layer records) -> the carved FFNs' spec


TRANSFORMS: dict[type, Transform] = {
    ExpertsConfig: Transform(build_experts, experts_spec),
    StaticConfig: Transform(build_static, experts_spec),
    SparseConfig: Transform(build_sparse, sparse_spec),
}


def carve_(model, config: CarveConfig, calibration: torch.Tensor, *,
           batch_size: int = 1, device=None, progress: bool = True, calibration_source: str = "tokens"):
    """Carve `model` (a dense `PreTrainedModel`) in place: its FFNs become carved FFNs and its class the carved
    one. Returns the same object.

    calibration: token ids [N, L]. batch_size: calibration sequences pushed through a layer at once.
    device: where each layer is carved (default: where the model is); layers go back afterwards, so
    peak memory on `device` is about one layer plus the calibration activations.
    """
    adapter = adapter_for(model)
    if is_carved(model):
        raise CMoEError("This model is already carved; carve the dense model it came from.")
    calibration = _check_calibration(calibration)
    first = adapter.read(adapter.layers(model)[0], model.config)
    config = config.for_ffn(first.width, 3 if first.gated else 2)
    transform = TRANSFORMS[type(config)]
    profile = config.check_ffn(first.width)  # fails before any work on an FFN the config cannot carve
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def carve_ffn(layer, ffn_inputs):
        carved, record, outputs = transform.build(ffn_inputs, adapter.read(layer, model.config), config)
        return carved, outputs, record

    started = time.perf_counter()
    layers = replace_ffns(model, adapter, list(calibration.split(batch_size)), carve_ffn, device,
                          desc=f"carving {config.name}", progress=progress)
    seconds = time.perf_counter() - started
    spec = transform.spec(model, adapter, config, first, layers)
    record = dict(cmoe_version=__version__, **_source(model), config=config.to_dict(), name=config.name, **profile,
                  calibration=dict(source=calibration_source, samples=calibration.shape[0], seqlen=calibration.shape[1]),
                  carve_seconds=round(seconds, 2), ffn_width=first.width,
                  ffn_compute=round(sum(layer["ffn_compute"] for layer in layers) / len(layers), 4), layers=layers)
    model.config, model.__class__ = carved_config(model.config, dict(spec.to_dict(), record=record))
    return model


def _source(model) -> dict:
    """Where the dense model came from: an absolute path with a fingerprint, a Hub id, or nothing."""
    name = getattr(model, "name_or_path", None)
    return source_record(name) if name else dict(source=None)


def _check_calibration(calibration) -> torch.Tensor:
    if calibration is None:
        raise CMoEError("No calibration data was given; pass token ids [N, L], e.g. from cmoe.data.calibration_tokens.")
    calibration = torch.as_tensor(calibration)
    if calibration.dim() == 1:
        calibration = calibration[None]
    if calibration.dim() != 2 or calibration.numel() == 0 or calibration.dtype.is_floating_point:
        raise CMoEError(f"Calibration must be integer token ids shaped [samples, seqlen], got {tuple(calibration.shape)}.")
    return calibration
