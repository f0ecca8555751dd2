"""The sparse preset: per-token activation sparsity calibrated to a budget, and the compute it really does."""

import pytest
import torch

import cmoe
from cmoe.moe import SparseFFN
from cmoe.moe.backends import SPARSE_CPU_DECODE
from conftest import counted_compute, tiny_model, tokens


def sparse_model(family="llama", budget=0.5):
    return cmoe.carve_(tiny_model(family), cmoe.CarveConfig(budget=budget, preset="sparse"), tokens(16, 64),
                       progress=False)


def ffns(model):
    return [m for m in model.modules() if isinstance(m, SparseFFN)]


def planned(layer, projections=3):
    """The share of the dense FFN's multiply-adds a layer's recorded split spends."""
    per_neuron = 1 + (projections - 1) * (1 - layer["input_share"]) if layer["completes"] else 1
    return ((projections - 1) * layer["input_share"] + layer["hidden_share"] * per_neuron) / projections


def test_a_budget_without_a_preset_takes_sparse():
    assert cmoe.CarveConfig(budget=0.75).preset == "sparse"
    assert cmoe.CarveConfig(budget=0.25).preset == "sparse"
    assert cmoe.CarveConfig(budget=0.25, preset="fitted").preset == "fitted"
    assert cmoe.CarveConfig(budget=0.5).for_ffn(1536, 3).name == "sparse0.5"


@pytest.mark.parametrize("counts", [dict(), dict(shared=3, active=3, experts=8)])
def test_sparse_needs_a_budget_and_no_layout(counts):
    with pytest.raises(cmoe.CMoEError, match="needs a budget"):
        cmoe.CarveConfig(preset="sparse", **counts)


@pytest.mark.parametrize("family,projections", [("llama", 3), ("gpt2", 2)])
def test_each_layer_splits_the_budget_and_its_thresholds_meet_it(family, projections):
    model = sparse_model(family)
    record = model.carve_record
    for layer in record["layers"]:
        assert planned(layer, projections) == pytest.approx(0.5, abs=1e-3)
        assert layer["ffn_compute"] == pytest.approx(0.5, abs=0.03)  # counted on the calibration tokens
    held_out = counted_compute(model, tokens(8, 64, seed=11).reshape(-1), 64, 8)
    assert held_out["overall"] == pytest.approx(0.5, abs=0.06)
    assert held_out["tokens"] == 512


def test_the_compute_count_follows_the_rows_read():
    model = sparse_model()
    ids = tokens(2, 40, seed=3).reshape(-1)
    for ffn in ffns(model):  # thresholds at 0 read every row: the dense FFN
        ffn.input_threshold.zero_()
        ffn.hidden_threshold.zero_()
    assert counted_compute(model, ids, 40, 2)["overall"] == pytest.approx(1.0)
    for ffn in ffns(model):  # no input read: gate and up are zero, so no neuron is read either
        ffn.input_threshold.fill_(float("inf"))
        ffn.hidden_threshold.fill_(1e-30)
    assert counted_compute(model, ids, 40, 2)["overall"] == 0.0
    assert not any(ffn.counting for ffn in ffns(model))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_decode_step_reads_only_the_rows_the_masks_keep_and_agrees_with_the_forward(dtype, tolerance):
    model = sparse_model(budget=0.5).to(dtype)
    ffn = ffns(model)[1]
    x = torch.randn(3, 32).to(dtype)
    with torch.no_grad():
        full = ffn.masked_forward(x)
        for token in range(3):
            step = ffn(x[token:token + 1])
            assert torch.allclose(step.float(), full[token:token + 1].float(), atol=tolerance * full.abs().max().item())
        masked_out = ffn.input_mask(x[:1])
        assert 0 < masked_out.float().mean() < 1  # the step really skips input channels


def test_a_sparse_model_is_not_the_dense_one_below_the_full_budget():
    dense = tiny_model("llama")
    model = sparse_model(budget=0.5)
    ids = tokens(2, 16, seed=4)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "opt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_decode_step_matches_the_pytorch_rows(family, dtype):
    from cmoe.moe import kernels

    if kernels.moe_cpu() is None:
        pytest.skip("the CPU kernels did not build here (no compiler); the PyTorch rows run instead")
    model = sparse_model(family).to(dtype)
    part = ffns(model)[1]
    x = torch.randn(16, 32).to(dtype)
    with torch.no_grad():
        compiled = SPARSE_CPU_DECODE.run(part, x).float()
        rows = part.decode_rows(x)
    rows = rows.float()
    error = (compiled - rows).norm(dim=1) / rows.norm(dim=1)
    if dtype == torch.float32:
        assert error.max() < 1e-5
    else:  # bfloat16 rounds differently in each path, which can move a value across a threshold now and then
        assert error.median() < 2e-2 and error.max() < 0.2, error
    assert rows.norm() > 0


def test_a_sparse_folder_is_described_by_inspect(tmp_path):
    from cmoe.tools.describe import describe, describe_text

    sparse_model("gpt2").save_pretrained(tmp_path / "out")
    text = describe_text(describe(tmp_path / "out"))
    assert "input channels read %" in text and "sparse0.5 (sparse preset" in text
    assert text.count("\n") >= 5 + 2  # a row per layer


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_the_avx512_decode_step_matches_the_portable_one(dtype, tolerance):
    from cmoe.moe import kernels

    compiled = kernels.moe_cpu()
    if compiled is None:
        pytest.skip("the CPU kernels did not build here (no compiler)")
    if not compiled.use_avx512(True) and dtype == torch.bfloat16:
        pytest.skip("this processor has no AVX512-BF16: only the portable step runs")
    torch.manual_seed(0)
    model = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(budget=0.5, preset="sparse"), tokens(16, 64),
                        progress=False)
    part = ffns(model.to(dtype))[0]
    x = torch.randn(4, 32).to(dtype)
    try:
        wide = SPARSE_CPU_DECODE.run(part, x).float()
        compiled.use_avx512(False)
        portable = SPARSE_CPU_DECODE.run(part, x).float()
    finally:
        compiled.use_avx512(True)
    assert torch.allclose(wide, portable, atol=tolerance * portable.abs().max().item())


def test_the_bench_ideal_ratio_of_a_sparse_ffn_is_its_compute_share():
    from cmoe.tools.bench import shape_of

    model = sparse_model()
    shape = shape_of(ffns(model)[0], 64, model.carve_record["ffn_compute"])
    assert shape.ideal_prefill_ratio(128) == pytest.approx(1 / model.carve_record["ffn_compute"])
    assert shape.ideal_decode_ratio(1) == pytest.approx(1 / model.carve_record["ffn_compute"])
    paper = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig.from_name("S2A2E8"), tokens(), progress=False)
    assert shape_of(paper.model.layers[0].mlp, 64, 0.3).compute_share is None  # only sparse FFNs take it


@pytest.mark.parametrize("budget", [0.97, 0.3])
def test_budgets_near_the_ends_still_split_to_the_budget(budget):
    model = sparse_model(budget=budget)
    for layer in model.carve_record["layers"]:
        assert 0 < layer["input_share"] <= 1 and 0 < layer["hidden_share"] <= 1
        assert planned(layer) == pytest.approx(budget, abs=1e-3)
        assert layer["ffn_compute"] == pytest.approx(budget, abs=0.03)


def completing_part(gated: bool, dtype=torch.float32):
    from types import SimpleNamespace

    torch.manual_seed(0)
    hidden, width = 32, 48
    ffn = SimpleNamespace(up=torch.randn(width, hidden) / 6, gate=torch.randn(width, hidden) / 6 if gated else None,
                          down=torch.randn(hidden, width) / 6, up_bias=None if gated else torch.randn(width) / 4,
                          act="silu" if gated else "gelu", down_bias=None, width=width, gated=gated)
    part = SparseFFN.from_dense(ffn, complete=True).to(dtype)
    part.input_threshold.fill_(0.6)
    part.hidden_threshold.fill_(0.05)
    part.completes.fill_(1)
    return part


@pytest.mark.parametrize("gated", [True, False])
def test_a_completing_layer_gives_the_neurons_it_keeps_their_exact_activations(gated):
    part = completing_part(gated)
    x = torch.randn(6, 32)
    with torch.no_grad():
        keep_in = part.input_mask(x)
        assert 0.2 < keep_in.float().mean() < 0.8
        predicted = part.hidden(x, keep_in)  # from the kept inputs alone: what chooses the neurons
        keep = part.hidden_mask(predicted)
        assert 0.2 < keep.float().mean() < 0.95
        exact = part.activation_of(x @ part.gate_up_proj)
        expected = (exact * keep) @ part.down_proj
        assert not torch.allclose((predicted * keep) @ part.down_proj, expected, atol=1e-3)  # completion matters
        assert torch.allclose(part(x), expected, atol=1e-5)
        rows = torch.empty_like(x)
        for token in range(len(x)):
            part.row_into(rows[token], x[token])
        assert torch.allclose(rows, expected, atol=1e-5)
        assert torch.allclose(part(x[:4]), expected[:4], atol=1e-5)  # the compiled step where it built


def test_the_compiled_completing_step_in_bfloat16_agrees_with_the_rows():
    from cmoe.moe import kernels

    if kernels.moe_cpu() is None:
        pytest.skip("the CPU kernels did not build here (no compiler)")
    part = completing_part(True, torch.bfloat16)
    x = torch.randn(16, 32).to(torch.bfloat16)
    with torch.no_grad():
        compiled = SPARSE_CPU_DECODE.run(part, x).float()
        rows = part.decode_rows(x)
    error = (compiled - rows.float()).norm(dim=1) / rows.float().norm(dim=1)
    assert error.median() < 2e-2 and error.max() < 0.2, error  # a value near a threshold may cross it


def test_the_compute_count_of_a_completing_layer_adds_the_completed_sums():
    part = completing_part(True)
    x = torch.randn(10, 32)
    part.counting = True
    with torch.no_grad():
        part(x)
    part.counting = False
    keep_in = part.input_mask(x)
    keep = part.hidden_mask(part.hidden(x, keep_in))
    hidden, width = 32, 48
    per_token = 2 * width * keep_in.sum(1) + keep.sum(1) * (hidden + 2 * (~keep_in).sum(1))
    assert part.counted_share(width, 10) == pytest.approx((per_token.sum() / (3 * hidden * width * 10)).item())


@pytest.mark.parametrize("completion", [True, False])
def test_only_a_model_whose_layers_complete_keeps_the_neuron_major_copy(tmp_path, monkeypatch, completion):
    from cmoe.core import sparse

    if completion:
        monkeypatch.setattr(sparse, "HIDDEN_SHARES", ())  # only completing splits to choose from
    model = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(budget=0.5, complete=completion), tokens(16, 64),
                        progress=False)
    assert model.config.cmoe["complete"] is completion
    assert all(layer["completes"] is completion for layer in model.carve_record["layers"])
    assert all(("gate_up_rows" in dict(f.named_parameters())) is completion for f in ffns(model))
    ids = tokens(2, 12, seed=5)
    model.save_pretrained(tmp_path / "out")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.cmoe["complete"] is completion
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        generated = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
        again = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, again)


@pytest.mark.parametrize("compensate", [True, False])
def test_the_output_bias_takes_the_mean_of_what_the_skipped_rows_would_add(compensate):
    from cmoe.core.config import SparseConfig
    from cmoe.core.sparse import build_sparse, dense_output as _dense_output
    from cmoe.hf.adapters import adapter_for

    model = tiny_model("llama")
    ffn = adapter_for(model).read(adapter_for(model).layers(model)[0], model.config)
    x = torch.randn(512, 32) * torch.linspace(0.2, 3, 32)
    moe, record, out = build_sparse(x, ffn, SparseConfig(budget=0.5, compensate=compensate))
    with torch.no_grad():
        missing = (_dense_output(ffn, x) - moe(x)).mean(0)
    assert torch.allclose(out, moe(x).detach(), atol=1e-5)
    typical = _dense_output(ffn, x).abs().mean()
    if compensate:
        assert missing.abs().max() < 1e-4 * typical and record["bias_norm"] > 0
    else:
        assert missing.abs().max() > 1e-3 * typical and moe.down_bias is None


def test_no_complete_is_refused_for_presets_that_complete_nothing(tmp_path, capsys):
    from cmoe.tools.cli import main

    assert main(["carve", "stories260k", "-o", str(tmp_path / "out"), "--budget", "0.5", "--preset", "fitted",
                 "--no-complete"]) == 2
    assert "The fitted preset does not read complete (--no-complete)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
