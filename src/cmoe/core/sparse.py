"""The `sparse` preset's calibration (`SparseConfig`), one FFN at a time: per layer, the split of the budget between
the input side and down (completing the kept neurons' sums or not) whose output on calibration tokens is nearest
the dense FFN's, thresholds that make the calibration tokens read that share of rows on average, and the mean of
what the skipped rows would add folded into the output bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmoe.core.activations import ffn_activations
from cmoe.core.config import SparseConfig
from cmoe.hf.adapters import FFNWeights
from cmoe.moe import cost
from cmoe.moe.sparse import SparseFFN

# Each layer tries these shares of the budget for down (the rest goes to gate and up), and these shares of it for
# the inputs of a layer that completes its kept neurons' sums.
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
def build_sparse(x: torch.Tensor, ffn: FFNWeights, config: SparseConfig):
    """The sparse FFN for calibration inputs x [T, H], what to record of it, and its output on x. It holds the
    neuron-major copy that completion needs (the carve drops it where no layer of the model completes)."""
    sparse = SparseFFN.from_dense(ffn, output_bias=config.compensate, complete=True)
    compensate = config.compensate and config.budget < 1
    error, split = choose_split(sparse, x, ffn.gated, config.budget, compensate, config.complete)
    inputs = x.to(ffn.up.dtype)
    sparse.counting = True
    out = sparse(inputs)
    sparse.counting = False
    shift = None
    if compensate:  # over every calibration token, in float32
        shift = (dense_output(ffn, inputs) - out.float()).mean(0)
        sparse.down_bias += shift.to(sparse.down_bias.dtype)
        out = out + shift.to(out.dtype)
    record = dict(input_share=round(split.inputs, 4), hidden_share=round(split.neurons, 4), completes=split.complete,
                  split_error=round(error, 4), input_threshold=sparse.input_threshold.item(),
                  hidden_threshold=sparse.hidden_threshold.item(),
                  ffn_compute=round(sparse.counted_share(ffn.width, len(x)), 4),
                  bias_norm=None if shift is None else round(shift.norm().item(), 4))
    sparse.read_rows.zero_()
    return sparse, record, out.to(x.dtype)


def choose_split(sparse: SparseFFN, x: torch.Tensor, gated: bool, budget: float, compensate: bool,
                 complete: bool) -> tuple[float, Split]:
    """Set `sparse`'s thresholds and completion to the split of `budget` whose output on (a sample of) x is nearest
    the dense FFN's, after the mean correction where `compensate`; that split and its relative error."""
    sample = x[:: max(1, len(x) // SPLIT_TOKENS)].to(sparse.weight_dtype())
    dense = thresholded_output(sparse, sample, Split(1.0, 1.0))
    best = None
    for split in splits(budget, gated, complete):
        out = thresholded_output(sparse, sample, split)
        if compensate:
            out += (dense - out).mean(0)
        error = ((out - dense).norm() / dense.norm().clamp_min(1e-30)).item()
        if best is None or error < best[0]:
            best = (error, split, sparse.input_threshold.clone(), sparse.hidden_threshold.clone())
    error, split, input_threshold, hidden_threshold = best
    sparse.input_threshold.copy_(input_threshold)
    sparse.hidden_threshold.copy_(hidden_threshold)
    sparse.completes.fill_(float(split.complete))
    return error, split


def dense_output(ffn: FFNWeights, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN's output on x [T, H], in float32."""
    out = ffn_activations(x, ffn)[0] @ ffn.down.float().T
    return out if ffn.down_bias is None else out + ffn.down_bias.float()


def splits(budget: float, gated: bool, complete: bool = True) -> list[Split]:
    """The splits that spend `budget`: down taking HIDDEN_SHARES of it, or (completing) the inputs taking
    COMPLETED_INPUT_SHARES; near the full budget, where those would ask gate and up for more than every input,
    all inputs and the rest for down."""
    if budget >= 1:
        return [Split(1.0, 1.0)]
    found = []
    for neurons in (min(1.0, share * budget) for share in HIDDEN_SHARES):
        inputs = cost.sparse_inputs_for(budget, neurons, gated)
        if 0 < inputs <= 1:
            found.append(Split(inputs, neurons))
    for inputs in (share * budget for share in (COMPLETED_INPUT_SHARES if complete else ())):
        neurons = cost.sparse_neurons_for(budget, inputs, gated, complete=True)
        if 0 < neurons <= 1:
            found.append(Split(inputs, neurons, complete=True))
    return found or [Split(1.0, cost.sparse_neurons_for(budget, 1.0, gated, complete=False))]


def thresholded_output(sparse: SparseFFN, x: torch.Tensor, split: Split) -> torch.Tensor:
    """Set `sparse`'s thresholds so that x's tokens read `split`'s share of their input channels and of their
    neurons on average; its output on x (without the output bias), in float32."""
    sparse.input_threshold.fill_(_value_keeping((x.abs() * sparse.input_scale).float(), split.inputs))
    hidden = sparse.hidden(x)
    sparse.hidden_threshold.fill_(_value_keeping((hidden.abs() * sparse.hidden_scale).float(), split.neurons))
    return sparse.masked_products(x, split.complete).float()


def _value_keeping(scores: torch.Tensor, keep: float) -> float:
    """The value at or above which `keep` of the scores lie (0 keeps them all)."""
    if keep >= 1:
        return 0.0
    flat = scores.flatten()
    return flat.kthvalue(min(flat.numel(), max(1, round((1 - keep) * flat.numel())))).values.item()
