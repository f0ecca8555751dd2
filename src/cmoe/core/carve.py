"""`carve_(model, config, calibration)`: turn a dense causal LM into a CMoE model in place, one layer at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cmoe.core.activations import activation_marks, activation_rate, ffn_activations, fluctuation
from cmoe.core.calibration import replace_ffns
from cmoe.core.config import CarveConfig
from cmoe.core.grouping import group_neurons, static_groups
from cmoe.core.router_fit import (balance_selection_bias, expert_load, fill_router, fit_linear_router, imbalance,
                                  set_threshold)
from cmoe.errors import CMoEError
from cmoe.hf.adapters import FFNWeights, adapter_for
from cmoe.hf.modeling import carved_config, is_carved
from cmoe.moe.module import MoEFFN
from cmoe.moe.compute import layer_costs, share, sparse_share
from cmoe.moe.spec import MoESpec
from cmoe.version import __version__


def carve_(model, config: CarveConfig, calibration: torch.Tensor, *,
           batch_size: int = 1, device=None, progress: bool = True, calibration_source: str = "tokens"):
    """Carve `model` (a dense `PreTrainedModel`) in place into a CMoE model: its FFNs become MoE FFNs and its
    class the carved one. Returns the same object.

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
    expert_width = config.expert_width(first.width)  # fails early on a width the experts cannot split
    k_act = config.resolved_k_act(first.width)
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def carve_ffn(layer, ffn_inputs):
        moe, record, outputs = build_moe(ffn_inputs, adapter.read(layer, model.config), config, k_act, expert_width)
        return moe, outputs, record

    started = time.perf_counter()
    layer_records = replace_ffns(model, adapter, list(calibration.split(batch_size)), carve_ffn, device,
                                 desc=f"carving {config.name}", progress=progress)
    seconds = time.perf_counter() - started

    complete = config.preset == "sparse" and _keep_completion(model, adapter, layer_records)
    spec = MoESpec(hidden_size=first.up.shape[1], expert_width=expert_width, shared=config.shared,
                   active=config.top_k, experts=config.experts - config.dropped, act=first.act, gated=first.gated,
                   bias=first.up_bias is not None, router=config.router, output_bias=config.compensate,
                   sparse=config.preset == "sparse", complete=complete)
    section = dict(
        spec.to_dict(),
        record=dict(
            cmoe_version=__version__, **_source(model), config=config.to_dict(),
            name=config.name, k_act=k_act,
            calibration=dict(source=calibration_source, samples=calibration.shape[0], seqlen=calibration.shape[1]),
            carve_seconds=round(seconds, 2), ffn_width=first.width,
            ffn_compute=round(sum(layer["ffn_compute"] for layer in layer_records) / len(layer_records), 4),
            layers=layer_records,
        ),
    )
    model.config, model.__class__ = carved_config(model.config, section)
    return model


def _keep_completion(model, adapter, layer_records: list[dict]) -> bool:
    """Whether a sparse model keeps its neuron-major copies: only where some layer completes its sums (else the
    copies are dropped here)."""
    if any(record["completes"] for record in layer_records):
        return True
    for layer in adapter.layers(model):
        adapter.ffn_module(layer).shared.drop_completion()
    return False


def _source(model) -> dict:
    """Where the dense model came from: an absolute path with a fingerprint, a Hub id, or nothing."""
    from cmoe.hf.loading import source_record

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


def build_moe(x: torch.Tensor, ffn: FFNWeights, config: CarveConfig, k_act: int, expert_width: int):
    """Carve one FFN from its calibration inputs x [T, H]: the filled `MoEFFN`, what to record of it, and
    its output on x [T, H] (computed from the dense hidden activation, which it equals while gates are 1)."""
    if config.preset == "sparse":
        return build_sparse(x, ffn, config.budget, config.compensate, config.complete)
    if config.dropped:  # static: the neurons to keep, ranked over all tokens
        hidden, scores = ffn_activations(x, ffn, "real" if config.activation == "fluctuation" else config.activation)
        ranking = fluctuation(hidden, ffn) if config.activation == "fluctuation" else scores.mean(0)
        groups = static_groups(ranking, config.shared * expert_width, expert_width)
        rate = ranking / ranking.max().clamp_min(1e-30)
    else:
        hidden, scores = ffn_activations(x, ffn, config.activation)
        marks = activation_marks(scores, k_act)
        rate = activation_rate(marks)
        groups = group_neurons(marks, rate, config)
    del scores
    moe = MoEFFN.from_dense(ffn, groups.shared, groups.routed, config.top_k, config.router, config.compensate)
    record = dict(shared_neurons=groups.shared.tolist(), routed_neurons=groups.routed.tolist(),
                  representatives=groups.representatives.tolist(), kmeans_iterations=groups.iterations,
                  activation_rate=[round(r, 5) for r in rate.tolist()])
    keep = torch.zeros(hidden.shape, dtype=torch.bool, device=hidden.device)  # the neurons each token uses
    keep[:, groups.shared] = True
    compensation = None
    if config.compensate:
        left_out = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
        left_out[groups.shared] = False
        left_out[groups.routed.reshape(-1).to(hidden.device)] = False
        compensation = hidden[:, left_out].mean(0) @ ffn.down[:, left_out].float().T
        moe.down_bias.data += compensation.to(moe.down_bias.dtype)
    if moe.router is not None and config.router == "linear":
        record.update(router_fit=fit_linear_router(moe.router, x, hidden, ffn.down, groups.routed))
        if config.dynamic_k and config.active < config.routed:  # every expert active: nothing to choose
            record["router_fit"]["threshold"] = set_threshold(moe.router, x.to(ffn.up.dtype), config.calibrated_k)
    elif moe.router is not None:
        fill_router(moe.router, ffn, groups.representatives, config.normalise_router)
    if moe.router is not None:
        probs = moe.router.probabilities(x.to(ffn.up.dtype))
        before = expert_load(probs, moe.router.selection_bias, config.active)
        if config.balance:
            moe.router.selection_bias.copy_(balance_selection_bias(probs, config.active, config.balance_steps))
        after = expert_load(probs, moe.router.selection_bias, config.active)
        record.update(load_before=before.tolist(), load_after=after.tolist(),
                      imbalance_before=imbalance(before), imbalance_after=imbalance(after),
                      selection_bias=moe.router.selection_bias.tolist())
        chosen = moe.router(x.to(ffn.up.dtype))[1]  # [T, k]; E marks an empty slot
        # an empty slot's neurons are a column past the FFN's, dropped after the scatter
        table = torch.cat([groups.routed, groups.routed.new_full((1, expert_width), hidden.shape[1])]).to(x.device)
        keep = torch.cat([keep, keep.new_zeros(len(x), 1)], dim=1)
        keep = keep.scatter_(1, table[chosen].reshape(len(x), -1), True)[:, :-1]
    slots = 0 if moe.router is None else int((chosen < config.routed).sum())
    record["ffn_compute"] = round(share(*layer_costs(moe, ffn.width), len(x), slots), 4)
    out = (hidden * keep) @ ffn.down.float().T
    if ffn.down_bias is not None:
        out += ffn.down_bias.float()
    if compensation is not None:
        out += compensation
    return moe, record, out.to(x.dtype)


# The sparse preset tries these shares of the budget for down (the rest goes to gate and up) in each layer, and
# these shares of it for the inputs of a layer that completes its kept neurons' sums.
HIDDEN_SHARES = (0.45, 0.6, 0.75, 0.9)
COMPLETED_INPUT_SHARES = (0.6, 0.8)
SPLIT_TOKENS = 2048  # calibration tokens, evenly spaced, the split and the thresholds are set on


@dataclass(frozen=True)
class Split:
    """How a sparse layer spends its budget: the share of input channels gate and up read, the share of neurons
    down reads, and whether the kept neurons' sums are completed over the other inputs."""
    inputs: float
    neurons: float
    complete: bool = False


@torch.no_grad()
def build_sparse(x: torch.Tensor, ffn: FFNWeights, budget: float, compensate: bool = True, complete: bool = True):
    """The `sparse` preset's FFN for calibration inputs x [T, H]: per layer, the split of the budget (between the
    input side and down, completing the kept neurons or not) whose output on calibration tokens is nearest the
    dense FFN's (`complete` False: not completing), with thresholds set so that the calibration tokens read that
    share of rows on average, and (`compensate`) the mean of what the skipped rows would have added folded into the output bias. The layer
    holds the neuron-major copy that completion needs (the pipeline drops it where no layer completes)."""
    width = ffn.width
    moe = MoEFFN.from_dense(ffn, torch.arange(width), torch.empty(0, width, dtype=torch.long), 0, sparse=True,
                            complete=True, output_bias=compensate)
    part, projections = moe.shared, 3 if ffn.gated else 2
    compensate = compensate and budget < 1
    sample = x[:: max(1, len(x) // SPLIT_TOKENS)].to(ffn.up.dtype)
    dense = _thresholded_output(part, sample, Split(1.0, 1.0))
    best = None
    for split in _splits(budget, projections, complete):
        out = _thresholded_output(part, sample, split)
        if compensate:
            out += (dense - out).mean(0)
        error = ((out - dense).norm() / dense.norm().clamp_min(1e-30)).item()
        if best is None or error < best[0]:
            best = (error, split, part.input_threshold.clone(), part.hidden_threshold.clone())
    error, split, input_threshold, hidden_threshold = best
    part.input_threshold.copy_(input_threshold)
    part.hidden_threshold.copy_(hidden_threshold)
    part.completes.fill_(float(split.complete))
    inputs = x.to(ffn.up.dtype)
    part.counting = True
    out = moe(inputs)
    part.counting = False
    shift = None
    if compensate:  # over every calibration token, in float32
        shift = (_dense_output(ffn, inputs) - out.float()).mean(0)
        moe.down_bias += shift.to(moe.down_bias.dtype)
        out = out + shift.to(out.dtype)
    record = dict(input_share=round(split.inputs, 4), hidden_share=round(split.neurons, 4), completes=split.complete,
                  split_error=round(error, 4), input_threshold=part.input_threshold.item(),
                  hidden_threshold=part.hidden_threshold.item(), ffn_compute=round(sparse_share(part, width, len(x)), 4),
                  bias_norm=None if shift is None else round(shift.norm().item(), 4))
    part.read_rows.zero_()
    return moe, record, out.to(x.dtype)


def _dense_output(ffn: FFNWeights, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN's output on x [T, H], in float32."""
    out = ffn_activations(x, ffn)[0] @ ffn.down.float().T
    return out if ffn.down_bias is None else out + ffn.down_bias.float()


def _splits(budget: float, projections: int, complete: bool = True) -> list[Split]:
    """The splits that spend `budget`: down taking HIDDEN_SHARES of it, or (completing) the inputs taking
    COMPLETED_INPUT_SHARES; near the full budget, where those would ask gate and up for more than every input,
    all inputs and the rest for down."""
    if budget >= 1:
        return [Split(1.0, 1.0)]
    splits = []
    for down in (min(1.0, share * budget) for share in HIDDEN_SHARES):
        inputs = (projections * budget - down) / (projections - 1)
        if 0 < inputs <= 1:
            splits.append(Split(inputs, down))
    for inputs in (share * budget for share in (COMPLETED_INPUT_SHARES if complete else ())):
        # a kept neuron costs its down row and its gate and up sums over the inputs the first pass skipped
        neurons = (projections * budget - (projections - 1) * inputs) / (1 + (projections - 1) * (1 - inputs))
        if 0 < neurons <= 1:
            splits.append(Split(inputs, neurons, complete=True))
    return splits or [Split(1.0, projections * budget - (projections - 1))]


def _thresholded_output(part, x: torch.Tensor, split: Split) -> torch.Tensor:
    """Set `part`'s thresholds so that x's tokens read `split`'s share of their input channels and of their
    neurons on average; its output on x (without the FFN's output bias), in float32."""
    part.input_threshold.fill_(_value_keeping((x.abs() * part.input_scale).float(), split.inputs))
    hidden = part.hidden(x)
    part.hidden_threshold.fill_(_value_keeping((hidden.abs() * part.hidden_scale).float(), split.neurons))
    return part.masked_forward(x, split.complete).float()


def _value_keeping(scores: torch.Tensor, keep: float) -> float:
    """The value at or above which `keep` of the scores lie (0 keeps them all)."""
    if keep >= 1:
        return 0.0
    flat = scores.flatten()
    return flat.kthvalue(min(flat.numel(), max(1, round((1 - keep) * flat.numel())))).values.item()
