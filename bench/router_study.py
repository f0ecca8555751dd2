"""Issue 25, item 4: how close can a router come to the expert oracle? Routers fitted on calibration tokens.

    PYTHONPATH=src:bench python3 bench/router_study.py [--layouts S0A32E64] [--windows 4] [--steps 300]

For each layout, each layer's neurons are grouped by balanced k-means on contribution marks (the top 25% of
neurons a token by |h| x the norm of their down column), from the dense model's FFN inputs on the calibration
tokens (8 x 2,048 WikiText-2 validation, seed 0). Each token then runs the shared neurons and top-k routed
experts chosen by:
- representative: the paper's router, |act(g_r . x) * (u_r . x)| of the neuron nearest the expert's centre;
- fitted: the same form (so the same kernels and cost), its rows fitted by Adam so that each token's scores,
  scaled to unit length, match the experts' true output norms, scaled to unit length;
- oracle: the true norm of each expert's output (computes the full FFN; an upper bound).
Agreement (share of the oracle's top-k experts the router picks) is measured on the last 2,048 calibration
tokens, which the fit does not see; perplexity on the first `--windows` windows of WikiText-2 test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

import cmoe
from cmoe.core.activations import activation_marks, activation_rate, ffn_activations
from cmoe.core.grouping import group_neurons
from cmoe.data import calibration_tokens, eval_text, tokenize
from cmoe.hf.adapters import adapter_for
from cmoe.hf.loading import load_model
from cmoe.tools.perplexity import perplexity
from oracles import with_rule
from provenance import device_name, git_commit


def expert_norms(h: torch.Tensor, down: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """The norm of each routed expert's output [T, E] from the hidden activation h [T, I]."""
    return torch.stack([(h[:, group] @ down[:, group].T).norm(dim=-1) for group in routed], dim=-1)


def router_scores(x, gate_rows, up_rows, act):
    return (act(x @ gate_rows.T) * (x @ up_rows.T)).abs()


def fit_router(x, norms, gate_rows, up_rows, act, steps: int, lr: float, batch: int = 4096, seed: int = 0):
    """Fit the rows so that unit-length score vectors match unit-length expert-norm vectors (per token)."""
    gate_rows, up_rows = gate_rows.clone().requires_grad_(), up_rows.clone().requires_grad_()
    optimiser = torch.optim.Adam([gate_rows, up_rows], lr=lr)
    target = norms / norms.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(x), (batch,), generator=generator)
        with torch.enable_grad():
            s = router_scores(x[pick], gate_rows, up_rows, act)
            s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            loss = (s - target[pick]).pow(2).sum(-1).mean()
            optimiser.zero_grad()
            loss.backward()
        optimiser.step()
    return gate_rows.detach(), up_rows.detach(), float(loss)


def agreement(chosen: torch.Tensor, oracle: torch.Tensor, num_experts: int) -> float:
    hits = torch.zeros(len(chosen), num_experts, dtype=torch.bool)
    hits.scatter_(1, oracle, True)
    return float(hits.gather(1, chosen).float().mean())


class RoutedMask(nn.Module):
    """The dense FFN restricted per token to the shared neurons and the routed experts `choose(x, h)` picks."""

    def __init__(self, ffn, shared, routed, choose):
        super().__init__()
        self.ffn, self.routed, self.choose = ffn, routed, choose
        self.shared_mask = torch.zeros(ffn.width, dtype=torch.bool)
        self.shared_mask[shared] = True
        self.act = ACT2FN[ffn.act]

    def forward(self, x, *args, **kwargs):
        shape, ffn = x.shape, self.ffn
        x = x.reshape(-1, shape[-1])
        h = self.act(x @ ffn.gate.T) * (x @ ffn.up.T)
        chosen = self.choose(x, h)
        keep = self.shared_mask.expand(len(x), -1).clone()
        keep.scatter_(1, self.routed[chosen].reshape(len(x), -1), True)
        return ((h * keep) @ ffn.down.T).view(shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="S0A32E64")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--routers", default="representative,fitted,oracle")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "router_study_smollm2.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    ids = tokenize(tokenizer, eval_text("wikitext2"))
    inputs = [[] for _ in layers]
    hooks = [adapter.ffn_module(layer).register_forward_pre_hook(
        lambda module, a, i=i: inputs[i].append(a[0].reshape(-1, a[0].shape[-1]))) for i, layer in enumerate(layers)]
    for row in calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=0):
        model(row[None], use_cache=False)
    for hook in hooks:
        hook.remove()
    inputs = [torch.cat(chunks) for chunks in inputs]
    held_out = 2048
    rows = []

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=device_name("cpu"), git=git_commit(), model="SmolLM2-135M-Instruct",
                                            date=time.strftime("%Y-%m-%d"), rows=rows), indent=1))

    for layout in args.layouts.split(","):
        config = cmoe.CarveConfig.from_name(layout)
        routers = {name: [] for name in args.routers.split(",")}
        layer_rows = []
        started = time.perf_counter()
        for i, layer in enumerate(layers):
            ffn = adapter.read(layer, model.config)
            act = ACT2FN[ffn.act]
            x = inputs[i]
            h, scores = ffn_activations(x, ffn, "contribution")
            marks = activation_marks(scores, round(0.25 * ffn.width))
            groups = group_neurons(marks, activation_rate(marks), config)
            norms = expert_norms(h, ffn.down, groups.routed)
            fit_x, test_x = x[:-held_out], x[-held_out:]
            oracle = norms[-held_out:].topk(config.active, dim=-1).indices
            rep_gate, rep_up = ffn.gate[groups.representatives], ffn.up[groups.representatives]
            row = dict(layer=i)
            rep_chosen = router_scores(test_x, rep_gate, rep_up, act).topk(config.active, dim=-1).indices
            row["representative_agreement"] = agreement(rep_chosen, oracle, config.routed)
            if "representative" in routers:
                routers["representative"].append((groups, rep_gate, rep_up))
            if "fitted" in routers:
                t0 = time.perf_counter()
                gate_rows, up_rows, loss = fit_router(fit_x, norms[:-held_out], rep_gate, rep_up, act, args.steps, args.lr)
                chosen = router_scores(test_x, gate_rows, up_rows, act).topk(config.active, dim=-1).indices
                row.update(fitted_agreement=agreement(chosen, oracle, config.routed), fit_loss=loss,
                           fit_seconds=round(time.perf_counter() - t0, 2))
                routers["fitted"].append((groups, gate_rows, up_rows))
            if "oracle" in routers:
                routers["oracle"].append((groups, None, None))
            print(layout, json.dumps(row), flush=True)
            layer_rows.append(row)
        carve_seconds = round(time.perf_counter() - started, 1)
        for name, per_layer in routers.items():
            def make(i, ffn, per_layer=per_layer, name=name):
                groups, gate_rows, up_rows = per_layer[i]
                act = ACT2FN[ffn.act]
                if name == "oracle":
                    choose = lambda x, h: expert_norms(h, ffn.down, groups.routed).topk(config.active, dim=-1).indices
                else:
                    choose = lambda x, h: router_scores(x, gate_rows, up_rows, act).topk(config.active, dim=-1).indices
                return RoutedMask(ffn, groups.shared, groups.routed, choose)
            undo = with_rule(model, adapter, make)
            ppl = perplexity(model, ids, 2048, args.windows, progress=False)
            undo()
            mean_agreement = (None if name == "oracle" else
                              sum(r[f"{name}_agreement"] for r in layer_rows) / len(layer_rows))
            rows.append(dict(layout=layout, router=name, ffn_active=config.active_fraction, wikitext2_ppl=ppl,
                             windows=args.windows, mean_agreement=mean_agreement, steps=args.steps, lr=args.lr,
                             carve_seconds=carve_seconds, layers=layer_rows))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "layers"}), flush=True)
            save()


if __name__ == "__main__":
    main()
