"""What share of the dense FFN's multiply-adds a carved model does per token, counted as it runs (the formulas
are `cmoe.moe.cost`'s). The chosen experts are counted by the routers themselves (`Router.count_load`), not
assumed from top_k; a sparse FFN counts the input channels and neurons each token reads (`SparseFFN.read_rows`).
"""

from __future__ import annotations

from contextlib import contextmanager

from cmoe.moe import cost
from cmoe.moe.module import MoEFFN
from cmoe.moe.sparse import SparseFFN


def dense_width(model) -> int:
    """The dense FFN's width the model was carved from (older records lack it: then no neuron was left out)."""
    section = model.config.cmoe
    recorded = section.get("record", {}).get("ffn_width")
    return recorded or section.get("width") or section["experts"] * section["expert_width"]


def moe_share(moe: MoEFFN, width: int, tokens: int, slots: int) -> float:
    """An MoE FFN's multiply-adds over the dense FFN's (of `width` neurons), for `tokens` tokens that took `slots`
    (token, routed expert) pairs."""
    if not tokens:
        return float("nan")
    expert_width = moe.experts.width if moe.experts is not None else 1
    shared = 0 if moe.shared is None else moe.shared.width // expert_width
    routed = 0 if moe.router is None else moe.router.num_experts
    router = "linear" if moe.router is not None and moe.router.linear else "representative"
    fixed = cost.moe_macs(moe.hidden_size, expert_width, shared, routed, moe.gated, router, 0)
    per_expert = cost.dense_macs(moe.hidden_size, expert_width, moe.gated)
    return (fixed * tokens + per_expert * slots) / (cost.dense_macs(moe.hidden_size, width, moe.gated) * tokens)


def sparse_share(sparse: SparseFFN, width: int, tokens: int) -> float:
    """A sparse FFN's multiply-adds over the dense FFN's, from the rows it read for `tokens` tokens."""
    if not tokens:
        return float("nan")
    inputs, neurons, completed = sparse.read_rows.tolist()
    done = cost.sparse_macs(sparse.hidden_size, sparse.width, sparse.gated, inputs, neurons, completed)
    return done / (cost.dense_macs(sparse.hidden_size, width, sparse.gated) * tokens)


def _start(ffn) -> None:
    if ffn.kind == "sparse":
        ffn.read_rows.zero_()
        ffn.counting = True
    elif ffn.router is not None:
        ffn.router.load_counts.zero_()
        ffn.router.count_load = True


def _stop(ffn) -> None:
    if ffn.kind == "sparse":
        ffn.counting = False
    elif ffn.router is not None:
        ffn.router.count_load = False


def _share(ffn, width: int, tokens: int) -> float:
    if ffn.kind == "sparse":
        return sparse_share(ffn, width, tokens)
    return moe_share(ffn, width, tokens, 0 if ffn.router is None else int(ffn.router.load_counts.sum()))


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
        _start(ffn)

    def result() -> dict:
        layers = [_share(ffn, width, n) for ffn, n in zip(ffns, tokens)]
        overall = sum(layers) / len(layers) if layers else float("nan")
        return dict(overall=round(overall, 4), layers=[round(v, 4) for v in layers], tokens=tokens[0] if tokens else 0)

    try:
        yield result
    finally:
        for hook in hooks:
            hook.remove()
        for ffn in ffns:
            _stop(ffn)
