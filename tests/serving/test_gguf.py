"""llama.cpp (through llama-cpp-python) reads `cmoe export --gguf` files and computes what the refitted cmoe model
computes. Opt-in: `make serve-test` builds llama-cpp-python; without it every test here is skipped."""

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; `make serve-test` builds it")

import transformers as T  # noqa: E402

import cmoe  # noqa: E402
from cmoe.serving.gguf import fit_linear_routers, write_gguf  # noqa: E402

F32 = 0  # ggml's type number for float32
PROMPTS = [torch.randint(3, 5000, (64,), generator=torch.Generator().manual_seed(s)).tolist() for s in (21, 22)]


def smollm2_carved(layout):
    from cmoe.data import calibration_tokens
    from cmoe.hf.loading import load_model

    model, tokenizer = load_model("smollm2")
    cmoe.carve_(model, cmoe.CarveConfig.from_name(layout), calibration_tokens(tokenizer, "wikitext2", 4, 256),
                progress=False)
    return model, tokenizer


def random_carved(layout, tokenizer):
    """A random Llama with SmolLM2's vocabulary and tokenizer, wider heads than SmolLM2's, its own shapes."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                           rope_theta=10000.0, tie_word_embeddings=False)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    calibration = torch.randint(3, 5000, (4, 128), generator=torch.Generator().manual_seed(1))
    cmoe.carve_(model, cmoe.CarveConfig.from_name(layout), calibration, progress=False)
    return model


def logprobs_of(logits: torch.Tensor, prompt: list[int]) -> torch.Tensor:
    return torch.as_tensor(logits).float().log_softmax(-1)[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    smollm2, tokenizer = smollm2_carved("S1A1E8")
    cases = {"smollm2-S1A1E8": smollm2, "random-S2A1E8": random_carved("S2A1E8", tokenizer)}
    out = {}
    for name, model in cases.items():
        model.save_pretrained(root / name, tokenizer=tokenizer)
        reference = T.AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32).eval()
        calibration = torch.randint(3, 5000, (2, 128), generator=torch.Generator().manual_seed(2))
        fit_linear_routers(model, calibration, progress=False)
        write_gguf(model, root / name, root / f"{name}.gguf")
        out[name] = (model, reference, root / f"{name}.gguf")
    return out


@pytest.mark.parametrize("case", ["smollm2-S1A1E8", "random-S2A1E8"])
def test_llama_cpp_computes_the_refitted_model(exported, case):
    refitted, original, path = exported[case]
    # the KV cache in float32 (llama.cpp's default is float16, which alone moves SmolLM2's log-probs by up to 0.8)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0,
                          type_k=F32, type_v=F32)
    gaps, moved = [], 0.0
    for prompt in PROMPTS:
        llm.reset()
        llm.eval(prompt)
        served = logprobs_of(np.array(llm.scores[: len(prompt)]), prompt)
        with torch.no_grad():
            expected = logprobs_of(refitted(torch.tensor([prompt])).logits[0], prompt)
            ours = logprobs_of(original(torch.tensor([prompt])).logits[0], prompt)
        gaps.append((served - expected).abs())
        moved = max(moved, (ours - expected).abs().max().item())
    gaps = torch.cat(gaps)
    # float32 both, through llama.cpp's own kernels: tiny gaps, at most a couple of tokens further apart (a
    # float difference can tip a near-tie between two experts); a wrongly written file moves them all
    assert gaps.median().item() < 1e-4
    assert (gaps > 2e-3).sum().item() <= 2
    assert moved > 2e-2  # negative control: cmoe's own router gives other log-probs, so the comparison can fail
