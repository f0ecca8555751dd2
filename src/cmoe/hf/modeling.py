"""Carved models as `transformers` models.

For each supported dense family (LlamaForCausalLM, ...) there is a subclass, e.g. `CMoELlamaForCausalLM`,
whose config has model_type `cmoe_llama` and a `cmoe` section describing the experts. Its `__init__`
builds the dense model and swaps each FFN for an empty carved FFN of the section's kind (`cmoe.moe.empty_ffn`),
so `from_pretrained` fills it from the checkpoint. The base model (`CMoELlamaModel`, what `AutoModel` builds and serving engines wrap) does the
same. The classes are registered with the Auto classes when `cmoe` is imported.

A carved config with routed experts also carries the fields MoE models use for them (`num_experts`,
`num_experts_per_tok`, `moe_intermediate_size`, `n_shared_experts`, `shared_expert_intermediate_size`), so
that engines which read those (vLLM's Transformers backend) see an MoE model; cmoe itself reads the `cmoe`
section only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from cmoe.hf.adapters import SUPPORTED, adapter_for
from cmoe.hf.checks import LEGACY_SPARSE_KEYS, check_carved_folder
from cmoe.moe import MoESpec, empty_ffn, spec_from_dict
from cmoe.moe.spec import legacy_sparse
from cmoe.run_folder import atomic_directory

RECORD_FILE = "carve_record.json"
SERVING_CHECK = None  # set by a serving engine's plugin (cmoe.serving.vllm): checks each spec it builds


class CMoEMixin:
    """What a carved model adds to its dense family's class."""

    def __init__(self, config, *args, **kwargs):
        spec = spec_from_dict(config.cmoe, config.hidden_size)  # fails in one sentence on an impossible section
        if SERVING_CHECK is not None:
            SERVING_CHECK(spec)
        super().__init__(config, *args, **kwargs)
        adapter = adapter_for(config)
        for layer in adapter.layers(self):
            adapter.install(layer, empty_ffn(spec))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():  # weights' shapes against config.json, before loading
            config = check_carved_folder(folder)
            if legacy_sparse(config.get("cmoe") or {}):  # saved before SparseFFN: one module deeper
                kwargs.setdefault("key_mapping", LEGACY_SPARSE_KEYS)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        own_memory(model)
        return model

    @property
    def carve_record(self) -> dict:
        return self.config.cmoe.get("record", {})

    def save_pretrained(self, save_directory, *args, tokenizer=None, **kwargs):
        """Like `PreTrainedModel.save_pretrained`, but all-or-nothing, and with the tokenizer and carve record."""
        with atomic_directory(save_directory) as tmp:
            super().save_pretrained(tmp, *args, **kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (Path(tmp) / RECORD_FILE).write_text(json.dumps(self.carve_record, indent=2))


@torch.no_grad()
def own_memory(model) -> None:
    """Copy every CPU parameter and buffer of `model` out of the file it was loaded from into memory of its own.

    safetensors loads by mapping the file, and a tensor starts at its offset there. Misaligned, each vector load
    of the CPU decode step straddles two cache lines (torch's CPU allocator aligns to 64 bytes); and while any
    tensor still points into the map, every page of it that was read stays resident beside the copies, so a
    model whose tensors were only partly copied held up to twice its size. Buffers are registered anew rather
    than given new data: a buffer's old tensor object can outlive the swap and keep the map alive.
    """
    for parameter in model.parameters():
        if parameter.device.type == "cpu":
            parameter.data = parameter.data.clone()
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "cpu":
                module._buffers[name] = buffer.clone()


_CLASSES: dict[type, type] = {}  # dense CausalLM class -> carved class


def carved_class(dense_class: type) -> type:
    """The carved counterpart of a dense CausalLM class (created and registered once, with its base model's)."""
    if dense_class in _CLASSES:
        return _CLASSES[dense_class]
    dense_config = dense_class.config_class
    model_type = "cmoe_" + dense_config.model_type
    config_class = type("CMoE" + dense_config.__name__, (dense_config,), {"model_type": model_type})
    model_class = type("CMoE" + dense_class.__name__, (CMoEMixin, dense_class), {"config_class": config_class})
    dense_base = MODEL_MAPPING[dense_config]
    base_class = type("CMoE" + dense_base.__name__, (CMoEMixin, dense_base), {"config_class": config_class})
    for cls in (config_class, model_class, base_class):  # importable by name, so pickle finds them (engines' workers)
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls
    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    AutoModel.register(config_class, base_class, exist_ok=True)
    _CLASSES[dense_class] = model_class
    return model_class


def carved_classes() -> list[type]:
    """Every carved CausalLM class and base model class registered so far."""
    return [cls for model_class in _CLASSES.values()
            for cls in (model_class, MODEL_MAPPING[model_class.config_class])]


def register_all() -> None:
    for model_type in SUPPORTED:
        carved_class(MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]])


def carved_config(dense_config, spec: dict):
    """A carved model's config: the dense config's values, the carved model_type, and the `cmoe` section."""
    model_class = carved_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(dense_config)])
    values = dense_config.to_dict()
    for key in ("model_type", "architectures", "quantization_config", "transformers_version"):
        values.pop(key, None)
    config = model_class.config_class(**values, cmoe=spec, **moe_fields(spec_from_dict(spec)))
    config.architectures = [model_class.__name__]
    return config, model_class


def moe_fields(spec) -> dict:
    """The standard MoE config fields for a spec's routed experts (none where nothing is routed)."""
    if not isinstance(spec, MoESpec) or not spec.routed:
        return {}
    return dict(num_experts=spec.routed, num_experts_per_tok=spec.active, moe_intermediate_size=spec.expert_width,
                n_shared_experts=spec.shared, shared_expert_intermediate_size=spec.shared * spec.expert_width)


def is_carved(model) -> bool:
    return isinstance(model, CMoEMixin)
