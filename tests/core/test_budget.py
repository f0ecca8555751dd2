"""Carving to a compute budget (issue 25): the fitted and static presets, and the compute they really do."""

import math
from pathlib import Path

import pytest
import torch
import transformers as T

import cmoe
from cmoe.core.activations import activation_marks, activation_rate, ffn_activations
from cmoe.core.experts import build_static
from cmoe.core.grouping import group_neurons
from cmoe.core.router_fit import expert_output_norms, fit_linear_router
from cmoe.hf.adapters import adapter_for
from cmoe.core.presets import config_from_record
from cmoe.moe import MoEFFN, Router, cost
from conftest import counted_compute, tiny_model, tokens

STORIES = Path(__file__).resolve().parents[3] / "shared" / "models" / "stories260K"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("preset", ["fitted", "static", "sparse"])
def test_the_full_budget_equals_dense(family, preset):
    model = tiny_model(family)
    ids = tokens()
    dense = logits(model, ids)
    carved = cmoe.carve_(model, cmoe.CarveConfig(budget=1.0, preset=preset), tokens(seed=2), progress=False)
    assert torch.allclose(logits(carved, ids), dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())


@pytest.mark.parametrize("width,projections", [(64, 3), (1536, 3), (11008, 3), (172, 3), (3072, 2), (8192, 3)])
@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75, 0.9])
def test_a_budget_gives_the_most_slices_that_fit_it(width, projections, budget):
    config = cmoe.CarveConfig(budget=budget, preset="fitted")
    if width == 172 and budget == 0.25:  # 172 = 4 x 43: 4 slices, and one of them and the router cost more
        with pytest.raises(cmoe.CMoEError, match="raise --budget"):
            config.for_ffn(width, projections)
        return
    config = config.for_ffn(width, projections)

    def router_cost(routed):
        return cost.router_share(routed, width, projections == 3, config.router)

    assert router_cost(config.routed) <= 0.02 or config.experts <= 8
    assert width % config.experts == 0 and config.routed >= config.active >= 1

    assert (config.shared + config.active) / config.experts + router_cost(config.routed) <= budget + 1e-9
    more = config.shared + config.active + 1
    if more <= config.experts:  # one slice more would not fit
        assert more / config.experts + router_cost(config.experts - more // 4) > budget
    static = cmoe.CarveConfig(budget=budget, preset="static").for_ffn(width, projections)
    assert static.active == 0 and static.routed == 0
    assert static.shared / static.experts == pytest.approx(budget, abs=0.5 / static.experts)


def test_a_budget_and_a_layout_cannot_both_be_given():
    with pytest.raises(cmoe.CMoEError, match="not both"):
        cmoe.CarveConfig(budget=0.5, shared=1)
    with pytest.raises(cmoe.CMoEError, match="budget must lie"):
        cmoe.CarveConfig(budget=1.5)
    with pytest.raises(cmoe.CMoEError, match="routes nothing"):
        cmoe.CarveConfig(shared=1, active=1, experts=4, preset="static")


def test_realised_compute_is_counted_with_the_router_not_assumed():
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(budget=0.5, preset="fitted", dynamic_k=False), tokens(), progress=False)
    config = config_from_record(carved.carve_record["config"])
    ffn = carved.model.layers[0].mlp
    hidden, width = 32, 64
    router = ffn.router.weight.shape[0] * hidden / (3 * hidden * width)
    assert router > 0  # the router's rows are part of the cost
    expected = (config.shared + config.active) / config.experts + router
    ids = tokens(2, 40, seed=3).reshape(-1)
    measured = counted_compute(carved, ids, 40, 2)
    assert measured["tokens"] == 80
    assert measured["overall"] == pytest.approx(expected, abs=1e-4) and measured["overall"] <= 0.5
    assert carved.carve_record["ffn_compute"] == pytest.approx(expected, abs=1e-4)
    for layer in carved.model.layers:  # one expert more per token shows up in the count
        layer.mlp.router.top_k += 1
    more = counted_compute(carved, ids, 40, 2)
    assert more["overall"] == pytest.approx(expected + 1 / config.experts, abs=1e-4)
    assert not any(layer.mlp.router.count_load for layer in carved.model.layers)  # counting is switched off again


def test_a_per_token_number_of_experts_keeps_to_the_budget_on_held_out_text():
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(budget=0.5, preset="fitted"), tokens(16, 64), progress=False)
    config = config_from_record(carved.carve_record["config"])
    mean = config.mean_active
    assert config.dynamic_k and config.active < mean < config.active + 1  # the budget, not a whole number of experts
    assert carved.model.layers[0].mlp.router.top_k == min(config.routed, 2 * math.ceil(mean))
    router = 8 / (3 * 64)
    per_expert = 1 / 8
    assert config.shared * per_expert + mean * per_expert + router == pytest.approx(0.5, abs=1e-3)
    assert carved.carve_record["ffn_compute"] <= 0.5  # on the calibration tokens, with the margin
    held_out = counted_compute(carved, tokens(8, 64, seed=11).reshape(-1), 64, 8)
    assert held_out["overall"] <= 0.5 + 0.02
    counts = [(share - router) / per_expert - config.shared for share in held_out["layers"]]
    assert all(1 < c < config.top_k for c in counts)  # tokens take different numbers of experts
    for layer in carved.model.layers:  # nothing clears the threshold: each token takes its best expert only
        layer.mlp.router.threshold.fill_(float("inf"))
    fewest = counted_compute(carved, tokens(8, 64, seed=11).reshape(-1), 64, 8)
    assert fewest["overall"] == pytest.approx(config.shared / 8 + per_expert + router, abs=1e-4)


def test_static_compensation_is_exact_for_a_constant_input():
    model = tiny_model("llama")
    ffn = adapter_for(model).read(model.model.layers[0], model.config)
    x0 = torch.randn(1, 32)
    config = cmoe.CarveConfig(budget=0.25, preset="static").for_ffn(64, 3)
    moe, record, out = build_static(x0.repeat(50, 1), ffn, config)
    assert len(record["shared_neurons"]) == 16 and moe.router is None
    with torch.no_grad():
        dense = model.model.layers[0].mlp(x0)
        assert torch.allclose(moe(x0), dense, atol=1e-6)
        assert torch.allclose(out[:1], dense, atol=1e-6)
        uncompensated = cmoe.CarveConfig(budget=0.25, preset="static", compensate=False).for_ffn(64, 3)
        bare = build_static(x0.repeat(50, 1), ffn, uncompensated)[0]
        assert not torch.allclose(bare(x0), dense, atol=1e-3)


def _agreement(scores, oracle, k):
    chosen = scores.topk(k, dim=-1).indices
    hits = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, oracle.topk(k, dim=-1).indices, True)
    return hits.gather(1, chosen).float().mean().item()


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K is not here")
def test_the_fitted_router_picks_the_oracles_experts_more_often_than_the_representative():
    from cmoe.hf.llama2c import load_llama2c

    model = load_llama2c(STORIES / "stories260K.bin")
    adapter = adapter_for(model)
    inputs = []
    layer = adapter.layers(model)[2]
    hook = adapter.ffn_module(layer).register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(torch.randint(3, 512, (16, 128), generator=torch.Generator().manual_seed(0)))
    hook.remove()
    x = torch.cat(inputs)
    ffn = adapter.read(layer, model.config)
    config = cmoe.CarveConfig(budget=0.5, preset="fitted").for_ffn(ffn.width, 3)
    hidden, scores = ffn_activations(x, ffn, "contribution")
    marks = activation_marks(scores, config.resolved_k_act(ffn.width))
    groups = group_neurons(marks, activation_rate(marks), config)
    fit, test = slice(0, 1536), slice(1536, None)
    oracle = expert_output_norms(hidden[test], ffn.down, groups.routed)
    linear = Router(x.shape[1], config.routed, config.active, ffn.act, True, False, "linear")
    fit_linear_router(linear, x[fit], hidden[fit], ffn.down, groups.routed)
    representative = Router(x.shape[1], config.routed, config.active, ffn.act, True, False)
    representative.weight.data.copy_(torch.cat([ffn.gate[groups.representatives], ffn.up[groups.representatives]]))
    with torch.no_grad():
        fitted = _agreement(linear.scores(x[test]), oracle, config.active)
        paper = _agreement(representative.scores(x[test]), oracle, config.active)
    assert fitted > paper + 0.05, (fitted, paper)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("preset", ["fitted", "static", "sparse"])
def test_budget_models_save_load_and_generate(family, preset, tmp_path):
    carved = cmoe.carve_(tiny_model(family), cmoe.CarveConfig(budget=0.5, preset=preset), tokens(), progress=False)
    carved.save_pretrained(tmp_path / "out")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tokens(2, 10, seed=5)
    assert torch.equal(logits(loaded, ids), logits(carved, ids))
    prompt = ids[:1, :4]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False),
                       carved.generate(prompt, max_new_tokens=6, do_sample=False))
    spec = loaded.config.cmoe
    assert spec["kind"] == ("sparse" if preset == "sparse" else "moe")
    assert spec["output_bias"] == (preset in ("static", "sparse"))  # the left-out mean folded in
    if preset != "sparse":
        assert spec["router"] == ("linear" if preset == "fitted" else "representative")
        modules = [m for m in loaded.modules() if isinstance(m, MoEFFN)]
        assert (modules[0].router is None) == (preset != "fitted")
