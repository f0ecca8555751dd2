"""What share of the dense FFN's multiply-adds a carved model does per token, counted as it runs.

Per layer and token: the shared part, the router's rows and, per chosen expert, its rows, each an H-long
dot product (gate, up and down: three per neuron in a gated FFN, two in a plain one), over the dense FFN's.
The chosen experts are counted by the routers themselves (`Router.count_load`), not assumed from top_k; a
`sparse` FFN counts the input channels and neurons each token reads (`SparseNeurons.read_rows`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from cmoe.moe.module import MoEFFN


def dense_width(model) -> int:
    """The dense FFN's width the model was carved from (older records lack it: then no neuron was left out)."""
    section = model.config.cmoe
    return section.get("record", {}).get("ffn_width") or section["experts"] * section["expert_width"]


def layer_costs(moe: MoEFFN, width: int) -> tuple[float, float, float]:
    """Multiply-adds per token of `moe`: (always: shared part and router, per chosen expert, the dense FFN's)."""
    projections = 3 if (moe.experts or moe.shared).gated else 2
    hidden = moe.hidden_size
    shared = 0 if moe.shared is None else moe.shared.width * projections * hidden
    router = 0 if moe.router is None else moe.router.weight.shape[0] * hidden
    per_expert = 0 if moe.experts is None else moe.experts.width * projections * hidden
    return shared + router, per_expert, width * projections * hidden


def sparse_share(part, width: int, tokens: int) -> float:
    """A `SparseNeurons` part's multiply-adds over the dense FFN's, from the rows it read for `tokens` tokens:
    each input channel read costs a row of gate and up (2I, or I plain), each neuron read a row of down (H), and
    a completed neuron its gate and up entries of each input the first pass skipped."""
    if not tokens:
        return float("nan")
    projections = 3 if part.gated else 2
    inputs, neurons, completed = part.read_rows.tolist()
    hidden = part.input_scale.shape[0]
    done = (projections - 1) * (part.width * inputs + completed) + hidden * neurons
    return done / (projections * hidden * width * tokens)


def share(fixed: float, per_expert: float, dense: float, tokens: int, slots: int) -> float:
    return (fixed * tokens + per_expert * slots) / (dense * tokens) if tokens else float("nan")


@contextmanager
def counting_compute(model):
    """Count each MoE layer's tokens and chosen experts while the block runs; yields a function that gives
    `{"overall": share, "layers": [share, ...], "tokens": n}` so far. The routers count through the PyTorch
    forward, so the block runs a little slower."""
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    width = dense_width(model)
    tokens = [0] * len(moes)

    def counter(i):
        def hook(module, args):
            tokens[i] += args[0].reshape(-1, module.hidden_size).shape[0]
        return hook

    hooks = [m.register_forward_pre_hook(counter(i)) for i, m in enumerate(moes)]
    for m in moes:
        if m.router is not None:
            m.router.load_counts.zero_()
            m.router.count_load = True
        if m.sparse:
            m.shared.read_rows.zero_()
            m.shared.counting = True

    def result() -> dict:
        layers = []
        for m, n in zip(moes, tokens):
            if m.sparse:
                layers.append(sparse_share(m.shared, width, n))
                continue
            slots = 0 if m.router is None else int(m.router.load_counts.sum())
            layers.append(share(*layer_costs(m, width), n, slots))
        overall = sum(layers) / len(layers) if layers else float("nan")
        return dict(overall=round(overall, 4), layers=[round(v, 4) for v in layers], tokens=tokens[0] if tokens else 0)

    try:
        yield result
    finally:
        for hook in hooks:
            hook.remove()
        for m in moes:
            if m.router is not None:
                m.router.count_load = False
            if m.sparse:
                m.shared.counting = False


@torch.no_grad()
def measure_compute(model, ids: torch.Tensor, seqlen: int = 2048, max_windows: int = 1) -> dict:
    """The realised FFN compute on the first `max_windows` windows of `seqlen` tokens of `ids` [N]."""
    device = next(model.parameters()).device
    with counting_compute(model) as result:
        for start in range(0, min(len(ids), seqlen * max_windows), seqlen):
            model(ids[start:start + seqlen][None].to(device), use_cache=False)
        return result()
