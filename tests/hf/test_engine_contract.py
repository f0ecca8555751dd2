"""What serving engines rely on (cmoe.serving): the MoE config fields, the base model class, picklable classes,
and experts swapped for an engine's, called as transformers' MoE models call theirs. vLLM itself: tests/serve."""

import pickle

import pytest
import torch
import transformers as T
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import cmoe
from cmoe.errors import CMoEError
from cmoe.hf import modeling
from cmoe.moe import MoEFFN, Router
from cmoe.serving import vllm as serving_vllm
from cmoe.tools.cli import main as cmoe_main
from conftest import tiny_model, tokens

LAYOUTS = {
    "S1A1E8": dict(config=cmoe.CarveConfig.from_name("S1A1E8")),
    "S2A2E8": dict(config=cmoe.CarveConfig.from_name("S2A2E8")),
    "S2A2E8-trained-gates": dict(config=cmoe.CarveConfig.from_name("S2A2E8"), trained_gates=True),
    "fitted-0.5": dict(config=cmoe.CarveConfig(budget=0.5, preset="fitted")),
}


def carved(family="llama", config=None, trained_gates=False):
    model = tiny_model(family)
    cmoe.carve_(model, config or cmoe.CarveConfig.from_name("S2A2E8"), tokens(), progress=False)
    if trained_gates:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, Router):
                    module.gate_scale.normal_(generator=torch.Generator().manual_seed(3))
    return model


def transformers_experts(moe: MoEFFN) -> MixtralExperts:
    """transformers' own Mixtral experts holding our experts' weights: what an engine puts in their place."""
    experts = moe.experts
    config = T.MixtralConfig(num_local_experts=experts.num_experts, hidden_size=moe.hidden_size,
                             intermediate_size=experts.width, hidden_act=experts.act)
    swapped = MixtralExperts(config)
    swapped.gate_up_proj.data.copy_(experts.gate_up_proj)
    swapped.down_proj.data.copy_(experts.down_proj)
    return swapped


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_experts_called_the_standard_way_give_the_same_logits(layout):
    model = carved(**LAYOUTS[layout])
    ids = tokens(2, 16, seed=5)
    with torch.no_grad():
        expected = model(ids).logits
        for module in model.modules():
            if isinstance(module, MoEFFN):
                module.experts = transformers_experts(module)
        served = model(ids).logits
        # the standard path really runs: zeroing one expert's weights in the swapped module changes the output
        moved = next(m for m in model.modules() if isinstance(m, MoEFFN))
        moved.experts.down_proj.data.zero_()
        broken = model(ids).logits
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)
    assert (broken - expected).abs().max() > 1e-3


def test_config_carries_the_moe_fields_engines_read():
    model = carved(config=cmoe.CarveConfig.from_name("S2A2E8"))
    spec = model.config.cmoe
    assert model.config.num_experts == 6 and model.config.num_experts_per_tok == 2
    assert model.config.moe_intermediate_size == spec["expert_width"] == 8
    assert model.config.n_shared_experts == 2 and model.config.shared_expert_intermediate_size == 16
    for preset in ("sparse", "static"):  # nothing routed: no MoE fields, so engines do not take it for an MoE
        config = carved(config=cmoe.CarveConfig(budget=0.5, preset=preset)).config
        assert not hasattr(config, "num_experts")


def test_base_model_class_swaps_the_ffn_and_loads(tmp_path):
    model = carved()
    model.save_pretrained(tmp_path / "out")
    base = T.AutoModel.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(base).__name__ == "CMoELlamaModel"
    assert sum(isinstance(m, MoEFFN) for m in base.modules()) == model.config.num_hidden_layers
    ids = tokens(1, 12, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state)
    assert isinstance(T.AutoModel.from_config(model.config), modeling.CMoEMixin)


def test_carved_classes_pickle_by_name():
    model = carved()
    config = pickle.loads(pickle.dumps(model.config))
    assert type(config) is type(model.config) and config.cmoe == model.config.cmoe
    assert pickle.loads(pickle.dumps(type(model))) is type(model)


@pytest.mark.parametrize("family, preset, match", [
    ("llama", "sparse", "routes no experts"),
    ("llama", "static", "routes no experts"),
    ("gemma", "paper", "compute SiLU but this model's FFN uses gelu_pytorch_tanh"),
    ("gpt2", "paper", "compute SiLU"),
])
def test_models_vllm_would_get_wrong_are_refused(tmp_path, family, preset, match):
    config = (cmoe.CarveConfig.from_name("S2A2E8") if preset == "paper"
              else cmoe.CarveConfig(budget=0.5, preset=preset))
    carved(family, config).save_pretrained(tmp_path / "out")
    with pytest.raises(CMoEError, match=match):
        serving_vllm.check_folder(tmp_path / "out")


def test_the_plugin_checks_each_model_vllm_builds(monkeypatch):
    """The plugin's hook (what vLLM calls in each process) refuses a GELU model at construction."""
    monkeypatch.setattr(modeling, "SERVING_CHECK", None)
    serving_vllm.register()
    try:
        assert T.CMoELlamaForCausalLM is modeling.carved_class(T.LlamaForCausalLM)  # found by name, as vLLM looks
        assert T.CMoELlamaModel is T.AutoModel._model_mapping[type(carved().config)]
        config = carved("gemma").config
        with pytest.raises(CMoEError, match="SiLU"):
            T.AutoModel.from_config(config)
    finally:
        for cls in modeling.carved_classes():
            if cls.__name__ in vars(T):
                delattr(T, cls.__name__)


def test_serve_refuses_a_folder_that_is_not_carved(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    assert cmoe_main(["serve", str(tmp_path / "dense")]) == 2
    assert "is not a carved model" in capsys.readouterr().err


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_without_vllm_says_how_to_get_it(tmp_path, capsys):
    carved().save_pretrained(tmp_path / "out")
    assert cmoe_main(["serve", str(tmp_path / "out")]) == 2
    assert "vLLM is not installed in this environment" in capsys.readouterr().err
