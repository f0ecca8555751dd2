"""Where a carving method stands (issue 25): the static baseline and the two oracles, on the same windows.

    PYTHONPATH=src:bench python3 bench/oracles.py [--budgets 0.75,0.5,0.25] [--windows 4]
        [--partitions DIR[,DIR...]] [--out bench/results/oracles_smollm2.json]

Each FFN of SmolLM2 is computed in full and then restricted, token by token, to the neurons a rule keeps:
- static: the neurons with the highest activation rate on the calibration tokens (the paper's statistic),
  always on, nothing routed; "static + mean" adds the dropped neurons' mean output on the calibration tokens
  as a bias (FLAP's compensation); "static by contribution" ranks by the mean |h| x the norm of the neuron's
  down column instead (with and without the bias);
- neuron oracle: per token, the neurons with the largest |h| x the norm of their down column (no router);
- expert oracle: a carved folder's partition (its shared neurons and routed experts), with each token's
  top-k routed experts chosen by the true norm of each expert's output.
Calibration: 8 x 2,048 WikiText-2 validation tokens, seed 0 (as `cmoe carve`); evaluation: the first
`--windows` windows of 2,048 WikiText-2 test tokens. Upper bounds and baselines, not deployable models:
the full FFN is computed to choose. Writes one row per rule and budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

from cmoe.core.activations import activation_marks, activation_rate, ffn_activations
from cmoe.data import calibration_tokens, eval_text, tokenize
from cmoe.hf.adapters import adapter_for
from cmoe.hf.loading import load_model
from cmoe.tools.perplexity import perplexity
from provenance import device_name, git_commit


class MaskedFFN(nn.Module):
    """A dense FFN computed in full, then restricted per token to the neurons `keep(h)` marks (bool [T, I]),
    plus a constant output `bias` where given."""

    def __init__(self, ffn, keep, bias: torch.Tensor | None = None):
        super().__init__()
        self.ffn, self.keep, self.bias = ffn, keep, bias
        self.act = ACT2FN[ffn.act]

    def forward(self, x, *args, **kwargs):
        shape, ffn = x.shape, self.ffn
        x = x.reshape(-1, shape[-1])
        up = x @ ffn.up.T + (0 if ffn.up_bias is None else ffn.up_bias)
        h = self.act(up) if ffn.gate is None else self.act(x @ ffn.gate.T) * up
        out = (h * self.keep(h)) @ ffn.down.T
        if ffn.down_bias is not None:
            out = out + ffn.down_bias
        if self.bias is not None:
            out = out + self.bias
        return out.view(shape)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)


def neuron_oracle(ffn, budget: float):
    k, weight = round(budget * ffn.width), ffn.down.norm(dim=0)
    return lambda h: top_k_mask(h.abs() * weight, k)


def static_keep(kept: torch.Tensor, width: int):
    mask = torch.zeros(width, dtype=torch.bool)
    mask[kept] = True
    return lambda h: mask


def expert_oracle(ffn, shared: torch.Tensor, routed: torch.Tensor, top_k: int):
    """Shared neurons always; per token the top_k routed experts by the norm of their true output."""
    shared_mask = torch.zeros(ffn.width, dtype=torch.bool)
    shared_mask[shared] = True
    downs = [ffn.down[:, group] for group in routed]

    def keep(h):
        norms = torch.stack([(h[:, group] @ down.T).norm(dim=-1) for group, down in zip(routed, downs)], dim=-1)
        chosen = norms.topk(top_k, dim=-1).indices  # [T, k]
        mask = shared_mask.expand(h.shape[0], -1).clone()
        mask.scatter_(1, routed[chosen].reshape(h.shape[0], -1), True)
        return mask
    return keep


GROUPINGS = {  # name: (what marks a neuron on a token, how many a token marks, as a share of the FFN width)
    "paper marks (cosine, k_act 10)": ("cosine", None),
    "contribution marks, top 25% a token": ("contribution", 0.25),
    # not a mark but a value in [0, 1]: each neuron's contribution over the token's largest
    "contribution values, relative to the token's largest": ("contribution", "soft"),
}


def partitions(x: torch.Tensor, ffn, layouts: list[str], groupings: list[str]) -> dict:
    """For each grouping and layout (SxAyEz): the shared neurons and routed experts `group_neurons` makes from
    these FFN inputs x [T, H]."""
    import cmoe
    from cmoe.core.grouping import group_neurons

    made = {}
    for grouping in groupings:
        score, share = GROUPINGS[grouping]
        _, scores = ffn_activations(x, ffn, score)
        if share == "soft":  # k-means on values in [0, 1] (group_neurons' distances hold for them up to a
            marks = scores / scores.amax(dim=1, keepdim=True).clamp_min(1e-12)  # per-neuron constant)
            rate = marks.mean(0)
        else:
            marks = activation_marks(scores, 10 if share is None else round(share * ffn.width))
            rate = activation_rate(marks)
        for layout in layouts:
            groups = group_neurons(marks, rate, cmoe.CarveConfig.from_name(layout))
            made[(grouping, layout)] = (groups.shared, groups.routed)
    return made


@torch.no_grad()
def calibration_statistics(model, adapter, ids: torch.Tensor, layouts: list[str] = (), groupings=()) -> list[dict]:
    """Per layer, from the dense model's FFN inputs on the calibration tokens: the activation rate (the paper
    preset's cosine marks, k_act 10) and the mean hidden activation."""
    layers = adapter.layers(model)
    inputs = [[] for _ in layers]
    hooks = [adapter.ffn_module(layer).register_forward_pre_hook(
        lambda module, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(layers)]
    try:
        for row in ids:
            model(row[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    stats = []
    for i, layer in enumerate(layers):
        x = torch.cat(inputs[i])
        inputs[i] = None
        ffn = adapter.read(layer, model.config)
        hidden, scores = ffn_activations(x, ffn, "cosine")
        stats.append(dict(rate=activation_rate(activation_marks(scores, 10)), mean_hidden=hidden.mean(0),
                          contribution=hidden.abs().mean(0) * ffn.down.float().norm(dim=0),
                          partitions=partitions(x, ffn, list(layouts), list(groupings)) if layouts else {}))
    return stats


def dense_ffn_inputs(model, adapter, tokenizer, every: int = 4) -> list[torch.Tensor]:
    """Each layer's FFN inputs on the calibration text (8 x 2,048 WikiText-2 validation tokens, seed 0), every
    `every`-th token, from the dense model."""
    from cmoe.data import calibration_tokens

    layers = adapter.layers(model)
    inputs = [[] for _ in layers]
    hooks = [adapter.ffn_module(layer).register_forward_pre_hook(
        lambda m, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1])[::every]))
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        for row in calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=0):
            model(row[None], use_cache=False)
    for hook in hooks:
        hook.remove()
    return [torch.cat(c) for c in inputs]


def with_rule(model, adapter, make_module):
    """Install make_module(layer_index, ffn_weights) as every layer's FFN; returns a function that undoes it."""
    originals = []
    for i, layer in enumerate(adapter.layers(model)):
        originals.append(adapter.ffn_module(layer))
        adapter.install(layer, make_module(i, adapter.read(layer, model.config)))

    def undo():
        for layer, original in zip(adapter.layers(model), originals):
            adapter.install(layer, original)
    return undo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.75,0.5,0.25")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--partitions", default="", help="carved folders whose partitions the expert oracle uses")
    parser.add_argument("--groupings", default=";".join(GROUPINGS), help="which of GROUPINGS to try (; separated)")
    parser.add_argument("--grouping-layouts", default="",
                        help="layouts (e.g. S2A2E8,S8A8E32) whose partitions are made here, by each way of marking in "
                             "GROUPINGS, and scored by the expert oracle")
    parser.add_argument("--rules", default="static,static + mean,static by contribution,static by contribution + mean,"
                        "neuron oracle",
                        help="which of the per-budget rules to run (comma separated)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "oracles_smollm2.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model)
    ids = tokenize(tokenizer, eval_text("wikitext2"))
    rows = []

    def measure(rule: str, budget: float, **extra):
        started = time.perf_counter()
        ppl = perplexity(model, ids, 2048, args.windows, progress=False)
        rows.append(dict(rule=rule, ffn_active=budget, wikitext2_ppl=ppl, windows=args.windows,
                         seconds=round(time.perf_counter() - started, 1), **extra))
        print(json.dumps(rows[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=device_name("cpu"), git=git_commit(), model="SmolLM2-135M-Instruct",
                                            date=time.strftime("%Y-%m-%d"), rows=rows), indent=1))

    measure("dense", 1.0)
    layouts = list(filter(None, args.grouping_layouts.split(",")))
    groupings = list(filter(None, args.groupings.split(";")))
    stats = calibration_statistics(model, adapter, calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=0), layouts,
                                   groupings)
    for layout in layouts:
        import cmoe

        config = cmoe.CarveConfig.from_name(layout)
        for grouping in groupings:
            undo = with_rule(model, adapter, lambda i, ffn: MaskedFFN(ffn, expert_oracle(
                ffn, *stats[i]["partitions"][(grouping, layout)], config.active)))
            measure(f"expert oracle, {layout}, {grouping}", config.active_fraction, partition=layout, grouping=grouping)
            undo()
    for budget in [float(b) for b in filter(None, args.budgets.split(","))]:
        def static(i, ffn, compensate, rank="rate"):
            kept = stats[i][rank].sort(descending=True, stable=True).indices[: round(budget * ffn.width)]
            dropped = torch.ones(ffn.width, dtype=torch.bool)
            dropped[kept] = False
            bias = ffn.down[:, dropped] @ stats[i]["mean_hidden"][dropped] if compensate else None
            return MaskedFFN(ffn, static_keep(kept, ffn.width), bias)

        for rule, make in (("static", lambda i, ffn: static(i, ffn, False)),
                           ("static + mean", lambda i, ffn: static(i, ffn, True)),
                           ("static by contribution", lambda i, ffn: static(i, ffn, False, "contribution")),
                           ("static by contribution + mean", lambda i, ffn: static(i, ffn, True, "contribution")),
                           ("neuron oracle", lambda i, ffn: MaskedFFN(ffn, neuron_oracle(ffn, budget)))):
            if rule not in args.rules.split(","):
                continue
            undo = with_rule(model, adapter, make)
            measure(rule, budget)
            undo()
    for folder in filter(None, args.partitions.split(",")):
        record = json.loads((Path(folder) / "carve_record.json").read_text())
        top_k = record["config"]["active"]
        spec = record["config"]
        layers = record["layers"]
        undo = with_rule(model, adapter, lambda i, ffn: MaskedFFN(ffn, expert_oracle(
            ffn, torch.tensor(layers[i]["shared_neurons"]), torch.tensor(layers[i]["routed_neurons"]), top_k)))
        measure(f"expert oracle, {record['name']} partition", (spec["shared"] + spec["active"]) / spec["experts"],
                partition=record["name"])
        undo()


if __name__ == "__main__":
    main()
