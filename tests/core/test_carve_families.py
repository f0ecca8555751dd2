"""The key invariants, on a tiny random model of every supported family."""

import torch
import transformers as T

import cmoe
from cmoe.hf.adapters import adapter_for
from cmoe.core.config import ExpertsConfig
from cmoe.moe import MoEFFN
from conftest import tiny_model, tokens


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_every_expert_active_equals_dense(family):
    model = tiny_model(family)
    ids = tokens()
    dense = logits(model, ids)
    carved = cmoe.carve_(model, cmoe.CarveConfig(shared=2, active=6, experts=8), tokens(seed=2), progress=False)
    assert type(carved).__name__.startswith("CMoE")
    assert isinstance(adapter_for(carved).ffn_module(adapter_for(carved).layers(carved)[0]), MoEFFN)
    assert torch.allclose(logits(carved, ids), dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())


def test_fewer_experts_changes_output(family):
    model = tiny_model(family)
    ids = tokens()
    dense = logits(model, ids)
    carved = cmoe.carve_(model, cmoe.CarveConfig(shared=1, active=1, experts=4), tokens(seed=2), progress=False)
    assert not torch.allclose(logits(carved, ids), dense, atol=1e-4)


def test_groups_are_balanced_disjoint_and_shared_is_top_rate(family):
    model = tiny_model(family)
    carved = cmoe.carve_(model, cmoe.CarveConfig(shared=2, active=2, experts=8), tokens(), progress=False)
    for record in carved.carve_record["layers"]:
        routed = torch.tensor(record["routed_neurons"])
        shared = torch.tensor(record["shared_neurons"])
        assert routed.shape == (6, 8) and shared.numel() == 16  # 64 neurons / 8 experts = 8 each
        everything = torch.cat([shared, routed.flatten()])
        assert sorted(everything.tolist()) == list(range(64))
        rate = torch.tensor(record["activation_rate"])
        assert rate[shared].min() >= rate[routed.flatten()].max()
        for expert, representative in zip(routed.tolist(), record["representatives"]):
            assert representative in expert


def test_training_free_gates_are_one():
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=2, experts=4), tokens(), progress=False)
    router = carved.model.layers[0].mlp.router
    weights, chosen = router(torch.randn(10, 32))
    assert torch.equal(weights, torch.ones_like(weights))
    assert torch.equal(router.gate_scale, torch.zeros(3))


def test_save_load_identical_logits_and_generation(family, tmp_path):
    carved = cmoe.carve_(tiny_model(family), cmoe.CarveConfig(shared=1, active=2, experts=4), tokens(), progress=False)
    carved.save_pretrained(tmp_path / "out")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is type(carved)
    ids = tokens(2, 10, seed=5)
    assert torch.equal(logits(loaded, ids), logits(carved, ids))
    prompt = ids[:1, :4]
    generated = carved.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), generated)
    # The KV cache gives the same tokens as recomputing the whole sequence each step.
    assert torch.equal(carved.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False), generated)
    assert (tmp_path / "out" / "carve_record.json").is_file()
    assert loaded.carve_record["name"] == "S1A2E4"
    # safetensors places tensors at file offsets; on load every tensor is copied onto cache lines, out of the file
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert all(t.data_ptr() % 64 == 0 for t in tensors if t.numel())


def test_selection_bias_survives_save_load(tmp_path):
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=1, experts=4), tokens(8, 32), progress=False)
    bias = carved.model.layers[1].mlp.router.selection_bias.clone()
    assert bias.abs().sum() > 0  # balancing moved it
    carved.save_pretrained(tmp_path / "out")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.model.layers[1].mlp.router.selection_bias, bias)


def test_same_seed_same_model():
    first = cmoe.carve_(tiny_model("qwen2"), cmoe.CarveConfig(shared=1, active=2, experts=4, seed=3), tokens(), progress=False)
    second = cmoe.carve_(tiny_model("qwen2"), cmoe.CarveConfig(shared=1, active=2, experts=4, seed=3), tokens(), progress=False)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_balancing_evens_the_load():
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=0, active=1, experts=4), tokens(8, 64), progress=False)
    for record in carved.carve_record["layers"]:
        assert record["imbalance_after"] <= record["imbalance_before"]
        assert abs(sum(record["load_after"]) - 1) < 1e-6


def test_reference_preset_carves_and_differs_from_paper():
    paper = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=1, experts=4), tokens(), progress=False)
    reference = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=1, experts=4, preset="reference"),
                           tokens(), progress=False)
    assert reference.carve_record["config"]["distance"] == "l1"
    assert reference.carve_record["layers"][0]["kmeans_iterations"] == 1
    router_rows = reference.model.layers[0].mlp.router.weight
    assert torch.allclose(router_rows.norm(dim=-1), torch.ones(6), atol=1e-5)  # unit-length rows
    assert not torch.equal(router_rows, paper.model.layers[0].mlp.router.weight)


def test_each_layer_is_carved_from_what_the_carved_layers_before_it_give(family, monkeypatch):
    """The FFN inputs carving saw are the carved model's own FFN inputs on the calibration tokens
    (a carved, not dense, prefix; the FFN output replayed into each layer is the MoE's output)."""
    import sys

    carve_module = sys.modules["cmoe.core.carve"]
    seen = []
    real = carve_module.TRANSFORMS[ExpertsConfig]
    watched = carve_module.Transform(lambda x, *a: (seen.append(x.clone()), real.build(x, *a))[1], real.spec)
    monkeypatch.setitem(carve_module.TRANSFORMS, ExpertsConfig, watched)
    calibration = tokens(samples=3, seed=2)
    carved = cmoe.carve_(tiny_model(family), cmoe.CarveConfig(shared=1, active=1, experts=4), calibration,
                     batch_size=2, progress=False)
    adapter = adapter_for(carved)
    actual = []
    hooks = [adapter.ffn_module(layer).register_forward_pre_hook(
        lambda module, args: actual.append(args[0].reshape(-1, args[0].shape[-1]).clone()))
        for layer in adapter.layers(carved)]
    with torch.no_grad():
        for batch in calibration.split(2):
            carved(batch)
    for hook in hooks:
        hook.remove()
    layers = len(seen)
    for index in range(layers):
        got = torch.cat(actual[index::layers])  # hooks fire layer by layer within each batch
        assert torch.allclose(seen[index], got, atol=1e-5), f"layer {index}"
