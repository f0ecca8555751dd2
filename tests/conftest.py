"""Tiny randomly initialised models of every supported family, built from configs (no download)."""

import os

import pytest
import torch

# Without a GPU the Triton kernels' tests run in Triton's interpreter, which triton takes up when it is first
# imported (its own library functions are defined then), so it is chosen here, before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers as T  # noqa: E402

import cmoe  # noqa: E402, F401  (registers the carved classes)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": lambda: T.LlamaConfig(**COMMON),
    "mistral": lambda: T.MistralConfig(**COMMON),
    "qwen2": lambda: T.Qwen2Config(**COMMON),
    "qwen3": lambda: T.Qwen3Config(**COMMON),
    "gemma": lambda: T.GemmaConfig(**COMMON),
    "gemma2": lambda: T.Gemma2Config(**COMMON, sliding_window=8),
    "gemma3_text": lambda: T.Gemma3TextConfig(**COMMON, sliding_window=8),
    "phi3": lambda: T.Phi3Config(**{k: v for k, v in COMMON.items() if k != "head_dim"}),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                               word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=2, n_head=4, bos_token_id=1,
                                 eos_token_id=2),
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32).eval()
    # Random init leaves some biases and norms at trivial values; perturb everything so no case hides a bug.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def tokens(samples: int = 4, seqlen: int = 24, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (samples, seqlen), generator=generator)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <eos>) built offline, for tests that need text in and out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: i for i, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def tiny_text_model(seed: int = 0):
    """A tiny random Llama whose vocabulary matches `byte_tokenizer()`."""
    torch.manual_seed(seed)
    config = T.LlamaConfig(**{**COMMON, "vocab_size": 257, "pad_token_id": 256, "bos_token_id": 256, "eos_token_id": 256})
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@torch.no_grad()
def counted_compute(model, ids: torch.Tensor, seqlen: int, windows: int) -> dict:
    """The FFN compute a carved model counts on the first `windows` windows of `seqlen` tokens of ids [N]."""
    from cmoe.moe.compute import counting_compute

    with counting_compute(model) as result:
        for start in range(0, min(len(ids), seqlen * windows), seqlen):
            model(ids[start:start + seqlen][None], use_cache=False)
        return result()
