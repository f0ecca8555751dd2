"""Perplexity the standard way: tokenise the whole text once, non-overlapping windows, mean token NLL."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cmoe.data import eval_text, tokenize
from cmoe.errors import CMoEError
from cmoe.hf.modeling import is_carved
from cmoe.moe.compute import counting_compute


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean NLL of every predicted token) over non-overlapping windows of `seqlen` tokens of ids [1, n]."""
    ids = ids.reshape(-1)
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise CMoEError(f"The text has {ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen.")
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    for w in tqdm(range(windows), desc=desc, disable=not progress, leave=False):
        window = ids[w * seqlen : (w + 1) * seqlen].to(device)[None]
        logits = model(window, use_cache=False).logits[0, :-1].float()
        total_nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += seqlen - 1
    return math.exp(total_nll / count)


def evaluate_perplexity(model, tokenizer, sets=("wikitext2",), seqlen: int = 2048, max_windows: int | None = None,
                        data_dir=None, progress: bool = True) -> dict:
    """{set: {"ppl": ..., "windows": ..., "seconds": ...}} for each named evaluation set."""
    results = {}
    for name in sets:
        ids = tokenize(tokenizer, eval_text(name, data_dir))
        started = time.perf_counter()
        ppl = perplexity(model, ids, seqlen, max_windows, progress, desc=f"{name} ppl")
        windows = ids.numel() // seqlen if max_windows is None else min(ids.numel() // seqlen, max_windows)
        results[name] = dict(ppl=ppl, windows=windows, seqlen=seqlen, seconds=round(time.perf_counter() - started, 2))
    return results


def perplexity_and_compute(model, tokenizer, sets=("wikitext2",), seqlen: int = 2048, max_windows: int | None = None,
                           data_dir=None, progress: bool = True) -> tuple[dict, dict | None]:
    """`evaluate_perplexity`, with a carved model's FFN compute counted over every window of every set
    (`cmoe.moe.compute.counting_compute`'s result; None for a dense model)."""
    if not is_carved(model):
        return evaluate_perplexity(model, tokenizer, sets, seqlen, max_windows, data_dir, progress), None
    with counting_compute(model) as compute:
        results = evaluate_perplexity(model, tokenizer, sets, seqlen, max_windows, data_dir, progress)
        return results, compute()
