"""Carved folders that were edited or damaged: loading them gives one sentence (CMoEError), never a crash of the
process in the kernels nor a traceback, whatever the `cmoe` section says or however the weights are cut."""

import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cmoe
from cmoe.moe import kernels as cmoe_kernels
from cmoe.hf.checks import check_carved_folder
from cmoe.errors import CMoEError
from cmoe.hf.loading import load_model
from cmoe.moe import MoEFFN
from cmoe.moe.spec import spec_from_dict as check_spec
from cmoe.tools.describe import describe
from transformers import AutoModelForCausalLM
from conftest import tiny_model, tokens

SPEC = dict(hidden_size=64, expert_width=32, shared=1, active=1, experts=4, act="silu", gated=True, bias=False)


@pytest.fixture(scope="module")
def carved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("carved") / "S1A1E4"
    model = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=1, experts=4), tokens(), progress=False)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("edit", [dict(active=5), dict(active=0), dict(active=-1), dict(shared=9), dict(experts=0),
                                  dict(expert_width=0), dict(active=True), dict(act="nosuch"), dict(gated="yes"),
                                  dict(hidden_size=65), dict(sparse=True), dict(sparse="yes"), dict(kind="dense"),
                                  dict(complete=True)])
def test_impossible_specs_are_refused_in_one_sentence(edit):
    with pytest.raises(CMoEError) as error:
        check_spec({**SPEC, **edit}, hidden_size=64)
    assert "\n" not in str(error.value) and "carve the model again" in str(error.value)


def test_possible_specs_pass():
    check_spec(SPEC, 64)
    check_spec({**SPEC, "active": 3}, 64)  # more experts per token than carved for: slower, not broken
    check_spec({**SPEC, "shared": 4, "active": 0}, 64)  # every expert shared: a narrower dense FFN
    # a sparse section saved before the FFN kinds, and one saved since
    legacy = check_spec({**SPEC, "shared": 1, "active": 0, "experts": 1, "expert_width": 128, "sparse": True}, 64)
    assert legacy.kind == "sparse" and legacy.width == 128
    sparse = dict(kind="sparse", hidden_size=64, width=128, act="silu", gated=True, bias=False, complete=True)
    assert check_spec(sparse, 64) == legacy.__class__(**{**sparse, "output_bias": False})


def test_a_sound_folder_passes_and_loads(carved_folder):
    assert check_carved_folder(carved_folder)["cmoe"]["active"] == 1
    model, _ = load_model(str(carved_folder))
    assert model.config.cmoe["experts"] == 4


def _edited_copy(folder: Path, tmp_path: Path, name: str, **edits) -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["cmoe"].update(edits)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("edit", [dict(expert_width=8), dict(experts=5), dict(shared=2), dict(gated=False),
                                  dict(bias=True)])
def test_a_config_that_contradicts_the_weights_is_refused_before_loading(carved_folder, tmp_path, edit):
    copy = _edited_copy(carved_folder, tmp_path, "edited", **edit)
    with pytest.raises(CMoEError, match="weight .* (is missing|has shape)|MoE layers") as error:
        check_carved_folder(copy)
    assert "\n" not in str(error.value)


def test_truncated_weights_and_bad_json_are_refused(carved_folder, tmp_path):
    copy = tmp_path / "cut"
    shutil.copytree(carved_folder, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CMoEError, match="truncated or not a safetensors file"):
        check_carved_folder(copy)
    weights.write_bytes(b"\x05\x00")
    with pytest.raises(CMoEError, match="truncated or not a safetensors file"):
        check_carved_folder(copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CMoEError, match="cannot be read as JSON"):
        check_carved_folder(copy)


# Random edits of the cmoe section and cuts of the weights, each loaded and run (CPU kernels on) in one child
# process: a crash in a kernel would kill it, so the parent sees the process's end, not only its exceptions.
_FUZZ = textwrap.dedent("""
    import json, shutil, sys, torch
    from pathlib import Path
    import cmoe
    from cmoe.errors import CMoEError
    from cmoe.hf.loading import load_model
    source, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    for index, case in enumerate(cases):
        folder = source.parent / f"fuzz{index}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        config = json.loads((folder / "config.json").read_text())
        config["cmoe"].update(case.get("edit", {}))
        (folder / "config.json").write_text(json.dumps(config))
        if "cut" in case:
            weights = folder / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * case["cut"])])
        try:
            model, _ = load_model(str(folder))
            with torch.no_grad():
                for n in (1, 3, 40):  # the decode step, and the prefill kernel
                    model(torch.randint(0, model.config.vocab_size, (1, n)))
            print(json.dumps(dict(case=index, result="ran")), flush=True)
        except CMoEError as error:
            print(json.dumps(dict(case=index, result="refused", message=str(error))), flush=True)
    print("done", flush=True)
""")


def _fuzz_cases(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    values = dict(active=[0, 1, 2, 3, 4, 5, 7, -1], shared=[0, 1, 2, 3, 4, 5], experts=[1, 2, 3, 4, 5, 8],
                  expert_width=[1, 8, 16, 17, 32], hidden_size=[16, 32, 33], gated=[True, False], bias=[True, False],
                  act=["silu", "gelu", "relu", "nosuch"])
    cases = []
    for _ in range(count):
        keys = rng.sample(sorted(values), rng.randint(1, 3))
        case = dict(edit={key: rng.choice(values[key]) for key in keys})
        if rng.random() < 0.3:
            case["cut"] = rng.choice([0.1, 0.5, 0.9, 0.999])
        cases.append(case)
    return cases + [dict(cut=0.5), dict(cut=0.999), dict(edit=dict(active=3))]


def test_fuzzed_folders_never_crash_the_process(carved_folder, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(carved_folder, source)
    cases = _fuzz_cases(seed=0, count=40)
    done = subprocess.run([sys.executable, "-c", _FUZZ, str(source), json.dumps(cases)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("done"), done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases)
    spec = json.loads((carved_folder / "config.json").read_text())["cmoe"]
    for case, result in zip(cases, results):
        edit = case.get("edit", {})
        untouched = all(spec[key] == value for key, value in edit.items() if key != "active") and "cut" not in case
        if result["result"] == "refused":
            assert "\n" not in result["message"]
        else:  # only a sound folder, or one asking for another number of active experts that exist, may run
            assert untouched and 1 <= edit.get("active", 1) <= 3, (case, result)
    assert results[-1]["result"] == "ran"  # 3 active of 3 routed: a real, if slower, model
    assert {r["result"] for r in results} == {"ran", "refused"}


def test_the_kernels_refuse_shapes_that_disagree(monkeypatch):
    kernels = cmoe_kernels.moe_cpu()
    if kernels is None:
        pytest.skip("the CPU kernels do not build on this machine")
    moe = MoEFFN(64, 32, 1, 3, 2, "silu", True, False)
    x = torch.randn(2, 64)
    e, r, s = moe.experts, moe.router, moe.shared
    for top_k in (4, 0):  # past the 3 routed experts, and none
        for function in (kernels.moe_decode, kernels.moe_prefill):
            with pytest.raises(RuntimeError, match="top_k"):
                function(x, s.gate_up_proj, s.down_proj, None, r.weight, None, r.selection_bias, r.gate_scale, True,
                         e.gate_up_proj, None, e.down_proj, None, top_k, 0, True, False, float("-inf"))
    with pytest.raises(RuntimeError, match="do not agree"):
        kernels.moe_decode(x, s.gate_up_proj, s.down_proj, None, r.weight[:2], None, r.selection_bias, r.gate_scale,
                           True, e.gate_up_proj, None, e.down_proj, None, 2, 0, True, False, float("-inf"))


def test_the_spec_is_typed_and_round_trips_through_config_json(carved_folder):
    section = json.loads((carved_folder / "config.json").read_text())["cmoe"]
    spec = check_spec(section)
    assert (spec.shared, spec.active, spec.experts, spec.routed) == (1, 1, 4, 3) and spec.act == "silu"
    assert spec.to_dict() == {key: section[key] for key in spec.to_dict()} and "record" in section
    assert spec.kind == "moe" and isinstance(MoEFFN.from_spec(spec), MoEFFN)
    with pytest.raises(CMoEError, match="active experts of 3 routed"):
        check_spec({**section, "active": 4})


def _as_legacy_sparse(folder):
    """Rewrite a sparse folder as cmoe wrote them before the FFN kinds: the FFN's weights under `mlp.shared.`, the
    output bias beside them, and the cmoe section of an S1A0E1 MoE marked `sparse`."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    renamed = {(key if key.endswith("mlp.down_bias") or ".mlp." not in key else key.replace(".mlp.", ".mlp.shared."))
               : tensor for key, tensor in weights.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    section = config["cmoe"]
    width = section.pop("width")
    section.pop("kind")
    section.update(expert_width=width, shared=1, active=0, experts=1, router="representative", sparse=True)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_sparse_folder_saved_before_the_ffn_kinds_loads_with_the_same_outputs(tmp_path):
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(budget=0.5), tokens(8, 64), progress=False)
    carved.save_pretrained(tmp_path / "new")
    carved.save_pretrained(tmp_path / "old")
    _as_legacy_sparse(tmp_path / "old")
    ids = tokens(2, 12, seed=5)
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "new").eval()
    old = AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert old.config.cmoe.get("sparse") is True and "kind" not in old.config.cmoe
    with torch.no_grad():
        assert torch.equal(old(ids).logits, new(ids).logits)
        assert torch.equal(old.generate(ids[:1, :4], max_new_tokens=5, do_sample=False),
                           new.generate(ids[:1, :4], max_new_tokens=5, do_sample=False))
    assert describe(tmp_path / "old")["kind"] == "sparse"
    weights = tmp_path / "old" / "model.safetensors"  # a legacy folder's shapes are checked under its own names
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors.pop(next(key for key in tensors if key.endswith("mlp.shared.down_proj")))
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CMoEError, match="shared.down_proj is missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "old")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
@pytest.mark.parametrize("layout", ["S1A1E4", "budget"])
def test_a_loaded_carved_model_holds_no_page_of_its_file(tmp_path, layout):
    """Every tensor is copied out of the safetensors map, so the map is dropped and the model is resident once."""
    import gc

    config = cmoe.CarveConfig(budget=0.5) if layout == "budget" else cmoe.CarveConfig.from_name(layout)
    carved = cmoe.carve_(tiny_model("llama"), config, tokens(8, 32), progress=False)
    carved.save_pretrained(tmp_path / "out")
    weights = str((tmp_path / "out" / "model.safetensors").resolve())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    gc.collect()
    assert weights not in Path("/proc/self/maps").read_text()
    ids = tokens(2, 10, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, carved(ids).logits)
