"""The layer-by-layer calibration loop (GPTQ/Wanda style), written against the current transformers API.

`replace_ffns` owns the loop: it runs the calibration tokens through the model one decoder layer at a time,
hands each FFN's inputs to a transform that returns the new FFN and its outputs, installs the new FFN, and
carries on from what the new layer gives. `record_layer_inputs` runs the model once with every decoder layer
replaced by a pass-through stand-in, so the model itself computes what each layer receives (rotary
embeddings, the mask of the layer's attention type, ...) and we keep it; each layer then runs on those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


class _StandIn(nn.Module):
    """Takes a decoder layer's place: keeps the call's arguments and passes the hidden states through."""

    def __init__(self, layer: nn.Module, calls: list):
        super().__init__()
        self.layer = layer
        self.calls = calls

    def __getattr__(self, name):  # the model may read attributes such as `attention_type`
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


@dataclass
class LayerCall:
    """The extra arguments one decoder layer gets for one batch (everything but the hidden states)."""

    args: tuple
    kwargs: dict


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def record_layer_inputs(model, layers: nn.ModuleList, batches: list[torch.Tensor], device):
    """For each batch of token ids: the first layer's hidden states and every layer's extra arguments."""
    calls: list[list] = [[] for _ in layers]
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _StandIn(layer, calls[i])
    try:
        embed_device = model.get_input_embeddings().weight.device
        for ids in batches:
            model.base_model(input_ids=ids.to(embed_device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    hidden = [_to(call[0], device) for call in calls[0]]
    per_layer = [[LayerCall(_to(a, device), _to(k, device)) for _, a, k in layer_calls] for layer_calls in calls]
    return hidden, per_layer


class _Stop(Exception):
    pass


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def ffn_inputs_and_attention(layer, ffn_module, attention_module, hidden, calls):
    """Run `layer` up to its FFN for each batch: the FFN inputs, and the attention outputs to replay."""
    ffn_inputs, attention_outputs = [], []

    def grab_ffn_input(module, args):
        ffn_inputs.append(args[0].reshape(-1, args[0].shape[-1]))
        raise _Stop

    def grab_attention(module, args, output):
        attention_outputs.append(output)

    hooks = [ffn_module.register_forward_pre_hook(grab_ffn_input),
             attention_module.register_forward_hook(grab_attention)]
    try:
        for h, call in zip(hidden, calls):
            try:
                layer(h, *call.args, **call.kwargs)
            except _Stop:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    return ffn_inputs, attention_outputs


@torch.no_grad()
def run_layer_replaying(layer, adapter, attention_outputs, ffn_outputs, hidden, calls):
    """Run `layer` on each batch with its attention and FFN replaced by outputs computed earlier, so that
    neither runs twice; what is left (norms, residuals) runs as the model defines it. The caller puts the
    FFN module back with `adapter.install`."""
    attention = getattr(layer, adapter.attention)
    outputs = []
    try:
        for h, call, attention_out, ffn_out in zip(hidden, calls, attention_outputs, ffn_outputs):
            setattr(layer, adapter.attention, _Replay(attention_out))
            adapter.install(layer, _Replay(ffn_out, shaped_like_input=True))
            outputs.append(_first(layer(h, *call.args, **call.kwargs)))
    finally:
        setattr(layer, adapter.attention, attention)
    return outputs


class _Replay(nn.Module):
    """Stands in for a module and returns what it returned before (in the input's shape, if asked)."""

    def __init__(self, output, shaped_like_input: bool = False):
        super().__init__()
        self.output, self.shaped_like_input = output, shaped_like_input

    def forward(self, *args, **kwargs):
        return self.output.view(args[0].shape) if self.shaped_like_input else self.output


def replace_ffns(model, adapter, batches: list[torch.Tensor], transform, device, desc: str = "layers",
                 progress: bool = True) -> list:
    """Replace every decoder layer's FFN, first to last, by what `transform` makes of it; returns the transform's
    records, one a layer.

    transform(layer, ffn_inputs [T, H]) -> (new FFN module, its outputs on those inputs [T, H], record). Each
    layer sees what the layers before it, with their new FFNs, give; its attention runs once and the new FFN's
    outputs are replayed, not recomputed. Each layer is moved to `device` for its turn and back afterwards.
    """
    layers = adapter.layers(model)
    home = next(model.parameters()).device
    hidden, calls = record_layer_inputs(model, layers, batches, device)
    records = []
    for index, layer in enumerate(tqdm(layers, desc=desc, disable=not progress)):
        layer.to(device)
        ffn_inputs, attention_outputs = ffn_inputs_and_attention(
            layer, adapter.ffn_module(layer), getattr(layer, adapter.attention), hidden, calls[index])
        new_ffn, outputs, record = transform(layer, torch.cat(ffn_inputs))
        if index + 1 < len(layers):
            outputs = outputs.split([len(x) for x in ffn_inputs])
            hidden = run_layer_replaying(layer, adapter, attention_outputs, outputs, hidden, calls[index])
        adapter.install(layer, new_ffn)
        layer.to(home)
        records.append(record)
    return records
