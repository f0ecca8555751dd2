"""Export a top-1 carved model as a GGUF file for llama.cpp. Approximate: the router is refitted as a linear one.

llama.cpp's `ernie4_5-moe` architecture fits a carved Llama-family model: Llama attention, an ungated shared
part (`ffn_*_shexp`), softmax gating with the weights normalised over the chosen experts, so that with one
expert a token its weight is exactly 1, as a training-free carve's gate is. What does not fit is our router
(|act(g_r . x) * (u_r . x)| of each expert's representative neuron, plus the selection bias): llama.cpp scores
experts with one matrix. `fit_linear_routers` replaces each layer's router, in the carved model itself and
layer by layer on the inputs the layers before it now give, with a linear router fitted (logistic regression
on calibration tokens) to pick the expert ours picks; the model then computes what the GGUF file holds, and
`write_gguf` writes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmoe.errors import CMoEError
from cmoe.moe import MoESpec, Router, spec_from_dict
from cmoe.run_folder import atomic_file
from cmoe.serving import SILU

ARCH = "ernie4_5-moe"


def check_exportable(model) -> MoESpec:
    """The carved model's spec where a GGUF export can represent it; CMoEError in one sentence otherwise."""
    from cmoe.hf.modeling import is_carved

    if not is_carved(model):
        raise CMoEError("This is not a carved model; carve it first (cmoe carve MODEL -o OUT --config S1A1E8).")
    spec = spec_from_dict(model.config.cmoe)
    if model.config.model_type != "cmoe_llama":
        raise CMoEError(f"GGUF export takes carved Llama-family models (llama.cpp's {ARCH} has Llama attention); this "
                        f"one is {model.config.model_type.removeprefix('cmoe_')}.")
    if spec.kind != "moe" or not spec.routed or spec.active != 1:
        raise CMoEError(f"GGUF export takes layouts with one routed expert a token (S1A1E8, S2A1E16, ...), where "
                        f"llama.cpp's gate is exactly ours; this model is {_layout(spec)}.")
    if spec.act not in SILU or not spec.gated or spec.bias or spec.output_bias:
        raise CMoEError("GGUF export takes gated SiLU FFNs without biases (llama.cpp computes nothing else in "
                        f"{ARCH}); this model's FFN is {spec.act}{'' if spec.gated else ', plain'}"
                        f"{', with biases' if spec.bias or spec.output_bias else ''}.")
    rope = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        raise CMoEError(f"GGUF export writes plain RoPE; this model scales it ({rope}).")
    for module in model.modules():
        if isinstance(module, Router) and module.gate_scale.any():
            raise CMoEError("This model's gates were fine-tuned (1 + p * u), which llama.cpp cannot compute; export "
                            "the training-free carve instead.")
    return spec


def _layout(spec) -> str:
    if spec.kind == "sparse":
        return "sparse (per-token neurons, no experts)"
    return f"S{spec.shared}A{spec.active}E{spec.experts}"


DECAYS = (1e-2, 1e-3, 1e-4)  # weight decays tried (each fit starting from the last), on unit-variance features
HELD_OUT = 0.2  # the share of calibration tokens (the last ones) a decay is chosen on


@torch.no_grad()
def fit_linear_routers(model, calibration: torch.Tensor, progress: bool = True) -> list[dict]:
    """Replace every router of a top-1 carved model (in place) by a linear one fitted to choose the expert ours
    chooses, on the calibration tokens [N, L] as they reach that layer through the already refitted layers
    before it (the carve's layer loop). The weight decay is the one of DECAYS that agrees best on the last
    HELD_OUT of the tokens; the router is then refitted on all of them. Per layer: the agreement on the
    held-out tokens (with the decay chosen) and on all of them (the final router)."""
    from cmoe.core.calibration import replace_ffns
    from cmoe.hf.adapters import adapter_for

    adapter = adapter_for(model.config)

    def refit(layer, inputs):
        ffn = adapter.ffn_module(layer)
        x = inputs.float()
        chosen = ffn.router.select(inputs)[1][:, 0]
        held_out, decay, start = _choose_decay(x, chosen, ffn.router.num_experts)
        weight = _fit_logistic(x, chosen, ffn.router.num_experts, decay, start)
        linear = Router(ffn.hidden_size, ffn.router.num_experts, 1, ffn.router.act, ffn.router.gated, False, "linear")
        linear.weight.copy_(weight)
        linear.bias.zero_()
        ffn.router = linear.to(device=inputs.device, dtype=ffn.router.weight.dtype)
        agreement = (linear.scores(x).argmax(-1) == chosen).float().mean().item()
        record = dict(agreement_held_out=round(held_out, 4), agreement=round(agreement, 4), decay=decay)
        return ffn, ffn(inputs), record

    records = replace_ffns(model, adapter, list(calibration.split(1)), refit, next(model.parameters()).device,
                           desc="fitting routers", progress=progress)
    model.config.cmoe = {**model.config.cmoe, "router": "linear"}
    return [dict(layer=index, **record) for index, record in enumerate(records)]


def _choose_decay(x: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[float, float, torch.Tensor]:
    """(agreement on the held-out tokens, decay, weights fitted without them) for the decay of DECAYS that
    agrees best there."""
    split = int(len(x) * (1 - HELD_OUT))
    best, weight = None, None
    for decay in DECAYS:
        weight = _fit_logistic(x[:split], labels[:split], classes, decay, weight)
        agreement = ((x[split:] @ weight.T).argmax(-1) == labels[split:]).float().mean().item()
        if best is None or agreement > best[0]:
            best = (agreement, decay, weight)
    return best


def _fit_logistic(x: torch.Tensor, labels: torch.Tensor, classes: int, decay: float, start: torch.Tensor | None = None,
                  steps: int = 100) -> torch.Tensor:
    """W [classes, H] minimising the cross-entropy of softmax(x W^T) against labels (no bias: llama.cpp's router
    has none) plus `decay` |W|^2 (on the features scaled to unit variance); L-BFGS from `start` (or zeros)."""
    scale = x.std(0).clamp_min(1e-6)
    z = x / scale
    initial = torch.zeros(classes, x.shape[1]) if start is None else start * scale
    weight = initial.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([weight], lr=1, max_iter=steps, tolerance_change=1e-6, line_search_fn="strong_wolfe")

    def loss_fn():
        optimiser.zero_grad()
        loss = F.cross_entropy(z @ weight.T, labels) + decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(loss_fn)
    return (weight.detach() / scale).to(x.dtype)


def _rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K rows reordered for llama.cpp's RoPE, which rotates adjacent pairs where transformers rotates halves."""
    out_features, hidden = weight.shape
    half = out_features // heads // 2
    return weight.reshape(heads, 2, half, hidden).transpose(1, 2).reshape(out_features, hidden)


def write_gguf(model, tokenizer_folder: str | Path, path: str | Path, name: str = "cmoe") -> None:
    """Write a top-1 carved Llama-family model whose routers are linear (`fit_linear_routers`) as an
    `ernie4_5-moe` GGUF file, float32, with the tokenizer from `tokenizer_folder` (all or nothing)."""
    import gguf

    spec = check_exportable(model)
    if any(isinstance(m, Router) and not m.linear for m in model.modules()):
        raise CMoEError("The routers are not linear yet; run fit_linear_routers first.")
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_name(name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_expert_count(spec.routed)
        writer.add_expert_used_count(1)
        writer.add_expert_feed_forward_length(spec.expert_width)
        writer.add_expert_shared_feed_forward_length(spec.shared * spec.expert_width)
        writer.add_interleave_moe_layer_step(1)
        writer.add_leading_dense_block_count(0)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        _add_tokenizer(writer, Path(tokenizer_folder), config.vocab_size)
        for name_, tensor in _tensors(model, heads, kv_heads):
            writer.add_tensor(name_, tensor.detach().float().cpu().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _tensors(model, heads: int, kv_heads: int):
    """(GGUF name, tensor) in llama.cpp's layouts (a tensor [a, b] here is ne = (b, a) there)."""
    body = model.model
    yield "token_embd.weight", body.embed_tokens.weight
    yield "output_norm.weight", body.norm.weight
    if not model.config.tie_word_embeddings:
        yield "output.weight", model.lm_head.weight
    for i, layer in enumerate(body.layers):
        attention, ffn = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        yield f"blk.{i}.attn_q.weight", _rope_rows(attention.q_proj.weight, heads)
        yield f"blk.{i}.attn_k.weight", _rope_rows(attention.k_proj.weight, kv_heads)
        yield f"blk.{i}.attn_v.weight", attention.v_proj.weight
        yield f"blk.{i}.attn_output.weight", attention.o_proj.weight
        yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
        yield f"blk.{i}.ffn_gate_inp.weight", ffn.router.weight  # [E, H]
        width = ffn.experts.width
        yield f"blk.{i}.ffn_gate_exps.weight", ffn.experts.gate_up_proj[:, :width]  # [E, W, H]
        yield f"blk.{i}.ffn_up_exps.weight", ffn.experts.gate_up_proj[:, width:]
        yield f"blk.{i}.ffn_down_exps.weight", ffn.experts.down_proj  # [E, H, W]
        if ffn.shared is not None:
            shared_width = ffn.shared.width
            yield f"blk.{i}.ffn_gate_shexp.weight", ffn.shared.gate_up_proj[:shared_width]  # [S W, H]
            yield f"blk.{i}.ffn_up_shexp.weight", ffn.shared.gate_up_proj[shared_width:]
            yield f"blk.{i}.ffn_down_shexp.weight", ffn.shared.down_proj  # [H, S W]


def _add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """The tokenizer of a carved folder (a GPT-2-style byte-level BPE, or a Llama SentencePiece one)."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    vocab = None
    for kind in (BpeVocab, LlamaHfVocab):
        try:
            vocab = kind(folder)
            break
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            continue
    if vocab is None:
        raise CMoEError(f"{folder} holds no tokenizer GGUF export can convert (a byte-level BPE or Llama "
                        f"tokenizer.json); save the carved model with its tokenizer.")
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for index in range(len(tokens), vocab_size):  # the model's vocabulary can be padded past the tokenizer's
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer)
