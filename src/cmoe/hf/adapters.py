"""Model adapters: where each architecture keeps its decoder layers and FFN, and how to read and replace it.

An FFN is either gated, `down(act(gate(x)) * up(x))`, or plain, `down(act(up(x) + b_up)) + b_down`.
`FFNWeights` holds it in one layout (rows = hidden neurons) whatever the model stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cmoe.errors import CMoEError


@dataclass
class FFNWeights:
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    act: str  # a key of transformers.activations.ACT2FN
    gate: torch.Tensor | None = None  # [I, H]; None for a plain FFN
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]

    @property
    def width(self) -> int:
        return self.up.shape[0]

    @property
    def gated(self) -> bool:
        return self.gate is not None


def _act_name(config) -> str:
    for key in ("hidden_activation", "hidden_act", "activation_function"):
        name = getattr(config, key, None)
        if name:
            return name
    raise CMoEError(f"Cannot find the FFN activation in the {config.model_type} config.")


class Adapter:
    """Knows one family of architectures. Subclasses set the attribute names."""

    model_types: tuple[str, ...] = ()
    layers_path = "model.layers"
    attention = "self_attn"
    ffn = "mlp"

    def layers(self, model) -> nn.ModuleList:
        """The decoder layers of a causal LM or of its base model (what `AutoModel` builds)."""
        if model is model.base_model:  # the base model: the path inside it
            return model.get_submodule(self.layers_path.split(".", 1)[1])
        return model.get_submodule(self.layers_path)

    def ffn_module(self, layer) -> nn.Module:
        """The module whose first argument is the FFN input (we hook it to see that input)."""
        return getattr(layer, self.ffn)

    def read(self, layer, config) -> FFNWeights:
        raise NotImplementedError

    def install(self, layer, moe: nn.Module) -> None:
        setattr(layer, self.ffn, moe)


class GatedAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

    def read(self, layer, config):
        mlp = getattr(layer, self.ffn)
        if mlp.gate_proj.bias is not None:  # e.g. Llama's mlp_bias=True; the carved FFN has no gate bias
            raise CMoEError(f"This {config.model_type} model's FFN has biases on its gate and up projections, "
                            "which cmoe cannot carve yet; carve a model whose FFN has no biases.")
        return FFNWeights(
            gate=mlp.gate_proj.weight, up=mlp.up_proj.weight, down=mlp.down_proj.weight, act=_act_name(config),
            up_bias=mlp.up_proj.bias, down_bias=mlp.down_proj.bias,
        )


class Phi3Adapter(Adapter):
    model_types = ("phi3",)

    def read(self, layer, config):
        mlp = layer.mlp
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)  # Phi-3 fuses [gate; up] row-wise
        return FFNWeights(gate=gate, up=up, down=mlp.down_proj.weight, act=_act_name(config))


class GPTNeoXAdapter(Adapter):
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    attention = "attention"

    def read(self, layer, config):
        mlp = layer.mlp
        return FFNWeights(
            up=mlp.dense_h_to_4h.weight, up_bias=mlp.dense_h_to_4h.bias,
            down=mlp.dense_4h_to_h.weight, down_bias=mlp.dense_4h_to_h.bias, act=_act_name(config),
        )


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    attention = "attn"

    def read(self, layer, config):
        mlp = layer.mlp  # Conv1D stores weights as [in, out]
        return FFNWeights(
            up=mlp.c_fc.weight.t(), up_bias=mlp.c_fc.bias,
            down=mlp.c_proj.weight.t(), down_bias=mlp.c_proj.bias, act=_act_name(config),
        )


class OPTAdapter(Adapter):
    """OPT has no FFN module: fc1 -> activation_fn -> fc2 sit in the layer. The MoE takes fc1's place."""

    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    ffn = "fc1"

    def read(self, layer, config):
        return FFNWeights(
            up=layer.fc1.weight, up_bias=layer.fc1.bias,
            down=layer.fc2.weight, down_bias=layer.fc2.bias, act=_act_name(config),
        )

    def install(self, layer, moe):
        layer.fc1 = moe
        layer.activation_fn = nn.Identity()
        layer.fc2 = nn.Identity()


ADAPTERS: dict[str, Adapter] = {
    model_type: adapter for adapter in (GatedAdapter(), Phi3Adapter(), GPTNeoXAdapter(), GPT2Adapter(), OPTAdapter())
    for model_type in adapter.model_types
}

SUPPORTED = tuple(ADAPTERS)


def base_model_type(config) -> str:
    """The dense family of a config, also for an already carved one (model_type 'cmoe_llama' -> 'llama')."""
    model_type = config.model_type
    return model_type.removeprefix("cmoe_")


def adapter_for(model_or_config) -> Adapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = base_model_type(config)
    if model_type not in ADAPTERS:
        raise CMoEError(
            f"Model type {model_type!r} is not supported; cmoe carves decoder-only models of type "
            f"{', '.join(SUPPORTED)}."
        )
    return ADAPTERS[model_type]
