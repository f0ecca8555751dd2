"""`cmoe inspect`: what a saved carved model is, read from its config, carve record and router buffers, without
building the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open

from cmoe.errors import CMoEError
from cmoe.hf.checks import check_carved_folder
from cmoe.moe import spec_from_dict
from cmoe.tools.report import table


def describe(folder) -> dict:
    """The folder's carved FFNs, per layer, as a dict (`cmoe inspect --json`)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CMoEError(f"{folder} has no config.json; point inspect at a folder written by cmoe carve.")
    config = check_carved_folder(folder)  # config.json against itself and the weights' headers
    section = config.get("cmoe")
    if not section:
        raise CMoEError(f"{folder} holds a dense {config.get('model_type', 'unknown')} model, not a carved one; carve it first.")
    record_file = folder / "carve_record.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else section.get("record", {})
    spec = spec_from_dict(section)
    carved = record.get("config", {})
    info = dict(folder=str(folder), model_type=config.get("model_type"), name=record.get("name"),
                preset=carved.get("preset"), budget=carved.get("budget"), k_act=record.get("k_act"),
                calibration=record.get("calibration"), carve_seconds=record.get("carve_seconds"),
                cmoe_version=record.get("cmoe_version"), ffn_width=record.get("ffn_width"),
                ffn_compute=record.get("ffn_compute"), **spec.to_dict())
    if spec.kind == "sparse":
        info["layers"] = [_sparse_layer(index, layer) for index, layer in enumerate(record.get("layers", []))]
        return info
    buffers = _router_buffers(folder)
    info.update(active_fraction=round((spec.shared + spec.active) / spec.experts, 4),
                dynamic_k=bool(carved.get("dynamic_k")), mean_active=carved.get("mean_active") or carved.get("active"))
    info["layers"] = [_moe_layer(index, layer, spec, buffers.get(index, {}))
                      for index, layer in enumerate(record.get("layers", []))]
    return info


def _router_buffers(folder: Path) -> dict[int, dict]:
    """Each layer's saved selection bias and gate scales (what fine-tuning changes after the carve)."""
    buffers: dict[int, dict] = {}
    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                match = re.search(r"\.(\d+)\..*router\.(selection_bias|gate_scale)$", key)
                if match:
                    buffers.setdefault(int(match.group(1)), {})[match.group(2)] = f.get_tensor(key).float().tolist()
    return buffers


def _moe_layer(index: int, layer: dict, spec, buffers: dict) -> dict:
    bias = buffers.get("selection_bias", layer.get("selection_bias", []))
    scale = buffers.get("gate_scale", [])
    rates = layer.get("activation_rate")
    return dict(layer=index, shared_width=spec.shared * spec.expert_width, routed=spec.routed,
                expert_width=spec.expert_width, top_k=spec.active, kmeans_iterations=layer.get("kmeans_iterations"),
                imbalance_before=layer.get("imbalance_before"), imbalance_after=layer.get("imbalance_after"),
                bias_min=min(bias, default=None), bias_max=max(bias, default=None),
                gate_scale_max=max((abs(s) for s in scale), default=None),
                load_after=[round(v, 4) for v in layer.get("load_after", [])], ffn_compute=layer.get("ffn_compute"),
                mean_activation_rate=round(sum(rates) / len(rates), 4) if rates else None)


def _sparse_layer(index: int, layer: dict) -> dict:
    return dict(layer=index, input_share=layer.get("input_share"), hidden_share=layer.get("hidden_share"),
                completes=layer.get("completes"), ffn_compute=layer.get("ffn_compute"))


def describe_text(info: dict) -> str:
    """`cmoe inspect`'s printout of `describe`."""
    return (_sparse_text if info["kind"] == "sparse" else _moe_text)(info)


def _routed_per_token(info: dict) -> str:
    if info.get("dynamic_k"):
        return f"{info['mean_active']:g} on average (up to {info['active']})"
    return str(info["active"])


def _compute_line(info: dict) -> str:
    if info.get("ffn_compute") is None:  # carved before cmoe counted it
        return f"  {100 * info['active_fraction']:.1f}% of the carved FFN's neurons run per token"
    budget = "" if info.get("budget") is None else f" (budget {100 * info['budget']:.0f}%)"
    return (f"  FFN compute: {100 * info['ffn_compute']:.1f}% of the dense FFN's multiply-adds per token, router "
            f"included, counted on the calibration tokens{budget}")


def _title(info: dict) -> str:
    return f"{info['folder']}: {info['model_type']}, {info['name']} ({info['preset']} preset, cmoe {info['cmoe_version']})"


def _calibration_line(info: dict, k_act: bool) -> str:
    calibration = info.get("calibration") or {}
    profiled = f"; k_act {info['k_act']}" if k_act else ""
    return (f"  calibration: {calibration.get('source', '?')}, {calibration.get('samples', '?')} x "
            f"{calibration.get('seqlen', '?')} tokens{profiled}; carved in {info['carve_seconds']} s")


def _moe_text(info: dict) -> str:
    head = [
        _title(info),
        f"  experts: {info['shared']} shared + {_routed_per_token(info)} of {info['experts'] - info['shared']} routed per "
        f"token, {info['expert_width']} neurons each, {info['router']} router",
        _compute_line(info),
        _calibration_line(info, k_act=True),
        "",
    ]
    rows = [dict(layer=layer["layer"], shared=layer["shared_width"], routed=f"{layer['routed']} x {layer['expert_width']}",
                 k=layer["top_k"], iters=layer["kmeans_iterations"], compute=_percent(layer.get("ffn_compute")),
                 imbalance=None if layer["imbalance_before"] is None else
                 f"{layer['imbalance_before']:.2f} -> {layer['imbalance_after']:.2f}",
                 bias=None if layer["bias_min"] is None else f"{layer['bias_min']:+.3f} .. {layer['bias_max']:+.3f}",
                 load=" ".join(f"{100 * v:.0f}" for v in layer["load_after"]) or None)
            for layer in info["layers"]]
    columns = [("layer", "layer"), ("shared", "shared width"), ("routed", "routed experts x width"),
               ("k", "k, most" if info.get("dynamic_k") else "k"), ("compute", "FFN compute %"),
               ("iters", "k-means iters"), ("imbalance", "load max/mean before -> after"),
               ("bias", "selection bias min .. max"), ("load", "load per routed expert, % (calibration)")]
    return "\n".join(head) + table(rows, columns)


def _sparse_text(info: dict) -> str:
    head = [
        _title(info),
        f"  every one of the {info['width']} neurons kept; per token, gate and up read the input channels above "
        "a threshold and down the neurons above another (activation sparsity, no experts)",
        *(["  layers marked 'completed' finish their kept neurons' sums over every input channel (exact activations; a "
           "second, neuron-major copy of gate and up in every layer)"] if info.get("complete") else []),
        *(["  the mean of what the skipped rows would add on the calibration tokens is folded into an output bias"]
          if info.get("output_bias") else []),
        _compute_line(info),
        _calibration_line(info, k_act=False),
        "",
    ]
    rows = [dict(layer=layer["layer"], inputs=_percent(layer.get("input_share")), neurons=_percent(layer.get("hidden_share")),
                 completed="yes" if layer.get("completes") else "no", compute=_percent(layer.get("ffn_compute")))
            for layer in info["layers"]]
    columns = [("layer", "layer"), ("inputs", "input channels read %"), ("neurons", "neurons read by down %"),
               ("completed", "completed"), ("compute", "FFN compute % (calibration)")]
    return "\n".join(head) + table(rows, columns)


def _percent(share):
    return None if share is None else f"{100 * share:.1f}"
