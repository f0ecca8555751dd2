"""What share of the dense FFN's multiply-adds a carved model does per token, counted as it runs: each carved FFN
counts what it uses (`start_counting`, `counted_share`; the formulas are `cmoe.moe.cost`'s). The routers count the
experts they choose, not assumed from top_k; a sparse FFN counts the input channels and neurons each token reads.
"""

from __future__ import annotations

from contextlib import contextmanager

from cmoe.moe.module import MoEFFN
from cmoe.moe.sparse import SparseFFN


def dense_width(model) -> int:
    """The dense FFN's width the model was carved from (older records lack it: then no neuron was left out)."""
    section = model.config.cmoe
    recorded = section.get("record", {}).get("ffn_width")
    return recorded or section.get("width") or section["experts"] * section["expert_width"]


@contextmanager
def counting_compute(model):
    """Count each carved FFN's tokens and the rows or experts it uses while the block runs; yields a function that
    gives `{"overall": share, "layers": [share, ...], "tokens": n}` so far. The FFNs count through their PyTorch
    forward, so the block runs a little slower."""
    ffns = [m for m in model.modules() if isinstance(m, (MoEFFN, SparseFFN))]
    width = dense_width(model)
    tokens = [0] * len(ffns)

    def counter(i):
        def hook(module, args):
            tokens[i] += args[0].reshape(-1, module.hidden_size).shape[0]
        return hook

    hooks = [m.register_forward_pre_hook(counter(i)) for i, m in enumerate(ffns)]
    for ffn in ffns:
        ffn.start_counting()

    def result() -> dict:
        layers = [ffn.counted_share(width, n) for ffn, n in zip(ffns, tokens)]
        overall = sum(layers) / len(layers) if layers else float("nan")
        return dict(overall=round(overall, 4), layers=[round(v, 4) for v in layers], tokens=tokens[0] if tokens else 0)

    try:
        yield result
    finally:
        for hook in hooks:
            hook.remove()
        for ffn in ffns:
            ffn.stop_counting()
