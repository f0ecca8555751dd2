"""Convert a llama2.c checkpoint (e.g. stories260K) to a Hugging Face Llama model, plus its tokenizer."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cmoe.errors import CMoEError


def load_llama2c(path: str | Path) -> LlamaForCausalLM:
    """A float32 `LlamaForCausalLM` with the weights of a llama2.c legacy checkpoint."""
    raw = Path(path).read_bytes()
    if len(raw) < 28:
        raise CMoEError(f"{path} is too short to be a llama2.c checkpoint.")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("7i", raw[:28])
    shared_classifier = vocab > 0
    vocab = abs(vocab)
    sizes_ok = min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) > 0
    if not sizes_ok or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise CMoEError(f"{path} does not start with a llama2.c header (sizes {dim}, {hidden}, {n_layers}, {n_heads}, "
                        f"{n_kv_heads}, {vocab}, {seq_len}); give a legacy-format llama2.c checkpoint such as stories260K.bin.")
    head_dim = dim // n_heads
    data = np.frombuffer(raw, dtype=np.float32, offset=28, count=(len(raw) - 28) // 4)
    offset = 0

    def take(*shape):
        nonlocal offset
        size = int(np.prod(shape))
        if offset + size > data.size:
            raise CMoEError(f"{path} ends early; it is not a complete llama2.c checkpoint.")
        out = torch.from_numpy(data[offset : offset + size].copy()).reshape(shape)
        offset += size
        return out

    embed = take(vocab, dim)
    attn_norm = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, n_kv_heads * head_dim, dim)
    wv = take(n_layers, n_kv_heads * head_dim, dim)
    wo = take(n_layers, dim, dim)
    ffn_norm = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    final_norm = take(dim)
    offset += seq_len * head_dim  # RoPE tables (cos and sin, seq_len * head_dim / 2 each)
    classifier = embed if shared_classifier else take(vocab, dim)

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=shared_classifier,
        bos_token_id=1, eos_token_id=2, hidden_act="silu",
    )
    model = LlamaForCausalLM(config)

    def halves(w, heads):  # llama2.c rotates interleaved pairs, Hugging Face rotates halves
        return w.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)

    state = {"model.embed_tokens.weight": embed, "model.norm.weight": final_norm, "lm_head.weight": classifier}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": attn_norm[i], p + "post_attention_layernorm.weight": ffn_norm[i],
            p + "self_attn.q_proj.weight": halves(wq[i], n_heads), p + "self_attn.k_proj.weight": halves(wk[i], n_kv_heads),
            p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
            p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i], p + "mlp.up_proj.weight": w3[i],
        }
    model.load_state_dict(state, strict=True)
    return model.eval()


class Llama2cTokenizer:
    """llama2.c's tokenizer (tok512.bin and the like): greedy highest-score pair merging, byte fallback."""

    bos_id, eos_id = 1, 2

    def __init__(self, path: str | Path):
        raw = Path(path).read_bytes()
        (self.max_token_length,) = struct.unpack_from("i", raw, 0)
        pos, self.pieces, self.scores = 4, [], []
        while pos < len(raw):
            score, length = struct.unpack_from("fi", raw, pos)
            pos += 8
            self.pieces.append(raw[pos : pos + length].decode("utf-8", errors="replace"))
            self.scores.append(score)
            pos += length
        self.index = {piece: i for i, piece in enumerate(self.pieces)}

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = []
        for ch in " " + text:  # llama2.c adds a leading space
            if ch in self.index:
                ids.append(self.index[ch])
            else:
                ids += [self.index[f"<0x{b:02X}>"] for b in ch.encode("utf-8")]
        while True:
            best, best_score = None, -float("inf")
            for i in range(len(ids) - 1):
                merged = self.index.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best, best_score = (i, merged), self.scores[merged]
            if best is None:
                break
            i, merged = best
            ids[i : i + 2] = [merged]
        return ([self.bos_id] if bos else []) + ids

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            if i in (self.bos_id, self.eos_id):
                continue
            piece = self.pieces[i]
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                out.append(int(piece[3:5], 16))
            else:
                out += piece.encode("utf-8")
        return out.decode("utf-8", errors="replace").lstrip(" ")


def llama2c_tokenizer(path: str | Path):
    """llama2.c's tokenizer file as a `transformers` fast tokenizer that encodes as `Llama2cTokenizer` does.

    Its pieces are sentencepiece BPE merges: wherever two neighbouring pieces join into one in the
    vocabulary, the join with the highest score goes first. A BPE model whose merges are ranked by that
    score does the same, in linear time rather than the reference's quadratic loop (WikiText-2 is a million
    characters). Pieces never hold a space past their first character, so the text is split before each space.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    try:
        reference = Llama2cTokenizer(path)
    except (OSError, struct.error, ValueError) as error:
        raise CMoEError(f"{path} is not a llama2.c tokenizer file ({type(error).__name__}); use the tok*.bin that "
                        "came with the model.") from error
    vocab = {}
    for i, piece in enumerate(reference.pieces):
        vocab.setdefault(piece, i)
    merges = []
    for i in sorted(range(len(reference.pieces)), key=lambda i: (-reference.scores[i], i)):
        piece = reference.pieces[i]
        if i < 3 or (piece.startswith("<0x") and len(piece) == 6):
            continue
        merges += [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                   if piece[:cut] in vocab and piece[cut:] in vocab]
    model = models.BPE(vocab=vocab, merges=merges, unk_token=reference.pieces[0], byte_fallback=True,
                       fuse_unk=False, ignore_merges=False)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Prepend(" ")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=reference.pieces[0],
                                   bos_token=reference.pieces[reference.bos_id],
                                   eos_token=reference.pieces[reference.eos_id],
                                   split_special_tokens=True)  # "<unk>" in a text is text, as in llama2.c


def tokenizer_beside(checkpoint: str | Path, vocab_size: int):
    """The fast tokenizer of `tok<vocab>.bin` next to a llama2.c checkpoint (llama2.c's naming), or None."""
    path = Path(checkpoint).with_name(f"tok{vocab_size}.bin")
    return llama2c_tokenizer(path) if path.is_file() else None
