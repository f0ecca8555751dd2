"""`cmoe export --gguf`: refitted linear routers, the ernie4_5-moe file's tensors and keys, refusals.
llama.cpp reading the file back: tests/serve/test_gguf.py (make serve-test)."""


import gguf
import numpy as np
import pytest
import torch

import cmoe
from cmoe.errors import CMoEError
from cmoe.moe import MoEFFN, Router
from cmoe.serving.gguf import _rope_rows, check_exportable, fit_linear_routers, write_gguf
from cmoe.tools.cli import main as cmoe_main
from conftest import byte_tokenizer, tiny_model, tiny_text_model, tokens


def carved_text_model(layout="S2A1E8", folder=None):
    model = tiny_text_model()
    calibration = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    cmoe.carve_(model, cmoe.CarveConfig.from_name(layout), calibration, progress=False)
    if folder is not None:
        model.save_pretrained(folder, tokenizer=byte_tokenizer())
    return model, calibration


def test_fitted_routers_are_linear_top1_and_report_their_agreement():
    model, calibration = carved_text_model()
    originals = [m.router for m in model.modules() if isinstance(m, MoEFFN)]
    report = fit_linear_routers(model, calibration, progress=False)
    routers = [m.router for m in model.modules() if isinstance(m, MoEFFN)]
    assert len(report) == len(routers) == model.config.num_hidden_layers
    for record, router, original in zip(report, routers, originals):
        assert router.linear and router.top_k == 1 and not router.selection_bias.any() and not router.gate_scale.any()
        assert record["agreement"] > 2 / original.num_experts  # far better than chance
    # the first layer's inputs do not depend on any refitted router: its agreement can be recomputed
    first = next(m for m in model.modules() if isinstance(m, MoEFFN))
    seen = []
    handle = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(calibration)
    handle.remove()
    x = torch.cat(seen)
    agree = (first.router.select(x)[1][:, 0] == originals[0].select(x)[1][:, 0]).float().mean().item()
    assert agree == pytest.approx(report[0]["agreement"], abs=1e-4)
    assert model.config.cmoe["router"] == "linear"


def test_rope_rows_turn_rotate_half_into_adjacent_pairs():
    """RoPE on q's halves (transformers) equals, after the reordering, RoPE on adjacent pairs (llama.cpp NORM)."""
    heads, head_dim, hidden = 2, 8, 6
    weight, x = torch.randn(heads * head_dim, hidden), torch.randn(hidden)
    angle = 0.7 * torch.arange(head_dim // 2)
    cos, sin = angle.cos(), angle.sin()
    q = (weight @ x).view(heads, head_dim)
    first, second = q[:, : head_dim // 2], q[:, head_dim // 2:]
    halves = torch.cat([first * cos - second * sin, first * sin + second * cos], -1)  # transformers
    p = (_rope_rows(weight, heads) @ x).view(heads, head_dim // 2, 2)
    pairs = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 0] * sin + p[..., 1] * cos], -1)  # llama.cpp
    torch.testing.assert_close(pairs.reshape(heads, head_dim), _rope_rows(halves.reshape(-1, 1), heads).view(heads, -1))


def test_gguf_file_holds_the_model_in_llama_cpp_layouts(tmp_path):
    model, calibration = carved_text_model(folder=tmp_path / "out")
    fit_linear_routers(model, calibration, progress=False)
    write_gguf(model, tmp_path / "out", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    spec = model.config.cmoe
    assert fields["general.architecture"] == "ernie4_5-moe"
    assert fields["ernie4_5-moe.expert_count"] == spec["experts"] - spec["shared"]
    assert fields["ernie4_5-moe.expert_used_count"] == 1
    assert fields["ernie4_5-moe.expert_feed_forward_length"] == spec["expert_width"]
    assert fields["ernie4_5-moe.expert_shared_feed_forward_length"] == spec["shared"] * spec["expert_width"]
    assert len(fields["tokenizer.ggml.tokens"]) == model.config.vocab_size
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    ffn = model.model.layers[1].mlp
    width = ffn.experts.width
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate_inp.weight"], ffn.router.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_up_exps.weight"], ffn.experts.gate_up_proj[:, width:].detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_down_exps.weight"], ffn.experts.down_proj.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate_shexp.weight"],
                                  ffn.shared.gate_up_proj[: ffn.shared.width].detach().numpy())
    q = model.model.layers[1].self_attn.q_proj.weight
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], _rope_rows(q, model.config.num_attention_heads).detach().numpy())
    assert "output.weight" in tensors  # this model's embeddings are not tied
    assert len(tensors) == 3 + model.config.num_hidden_layers * 13


@pytest.mark.parametrize("make, match", [
    (lambda: carved_text_model("S2A2E8")[0], "one routed expert a token"),
    (lambda: _carved(tiny_model("gemma"), "S1A1E8"), "Llama-family"),
    (lambda: _carved(tiny_model("llama"), None), "one routed expert a token"),
    (lambda: _trained(carved_text_model("S1A1E8")[0]), "fine-tuned"),
])
def test_what_llama_cpp_cannot_compute_is_refused(make, match):
    with pytest.raises(CMoEError, match=match):
        check_exportable(make())


def _carved(model, layout):
    config = cmoe.CarveConfig(budget=0.5) if layout is None else cmoe.CarveConfig.from_name(layout)
    cmoe.carve_(model, config, tokens(), progress=False)
    return model


def _trained(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Router):
                module.gate_scale.fill_(0.5)
    return model


def test_export_command_writes_the_file_and_refuses_to_overwrite(tmp_path, capsys):
    carved_text_model(folder=tmp_path / "out")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    args = ["export", str(tmp_path / "out"), "--gguf", str(tmp_path / "m.gguf"), "--calib", str(tmp_path / "text.txt"),
            "--calib-samples", "2", "--calib-seqlen", "64", "--json", str(tmp_path / "r.json")]
    assert cmoe_main(args) == 0
    out = capsys.readouterr().out
    assert "approximate" in out and "picks cmoe's expert" in out
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "ernie4_5-moe"
    assert cmoe_main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out", "r.json", "text.txt"]  # no leftovers


def test_a_failed_export_leaves_no_file(tmp_path, capsys):
    carved_text_model("S2A2E8", folder=tmp_path / "out")
    assert cmoe_main(["export", str(tmp_path / "out"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "one routed expert a token" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()
