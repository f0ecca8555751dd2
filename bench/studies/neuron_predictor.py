"""Per-token neuron selection by a low-rank predictor (Deja Vu style), PPL on 4 windows, dense FFN inputs.

A rank-r activation-aware factorisation of [gate; up] predicts every neuron's g and u from x; the neurons with
the largest |act(g~) * u~| * ||down column|| are kept (top share k per token, or a per-layer threshold set on
calibration tokens), and only they are computed exactly (gate, up and down rows). FFN compute
r (H + 2I) / (3 H I) + k. Rules: VARIANT:r:k with VARIANT in {lr (top-k), lrthr (threshold), exact (r ignored:
the neuron oracle on h itself)}; or VARIANT:r:budget:B to set k from the budget."""
import json, sys, time
sys.path[:0] = ["src", "bench"]
import torch
from torch import nn
from transformers.activations import ACT2FN
from cmoe.data import eval_text, tokenize
from cmoe.hf.adapters import adapter_for
from cmoe.hf.loading import load_model
from cmoe.tools.perplexity import perplexity
from oracles import dense_ffn_inputs, with_rule, top_k_mask

torch.set_grad_enabled(False)


def predictor(ffn, x_cal, rank):
    """P (r x H), Q (2I x r) with [g; u] ~ Q P x, best rank r on the calibration inputs' distribution."""
    w = torch.cat([ffn.gate, ffn.up]).double()
    cov = (x_cal.double().T @ x_cal.double()) / len(x_cal)
    cov += 1e-6 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    chol = torch.linalg.cholesky(cov)
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    p = vh[:rank] @ torch.linalg.inv(chol)
    return p.float(), (u[:, :rank] * s[:rank]).float()


class PredictedFFN(nn.Module):
    def __init__(self, ffn, rank, k, x_cal, threshold):
        super().__init__()
        self.ffn, self.k, self.rank = ffn, k, rank
        self.act = ACT2FN[ffn.act]
        self.out_weight = ffn.down.norm(dim=0)
        self.pq = predictor(ffn, x_cal, rank) if isinstance(rank, int) and rank > 0 else None
        if isinstance(rank, float):
            self.pq = rank
        self.th = self.tx = None
        if threshold == "both":
            w = (ffn.gate.norm(dim=0) ** 2 + ffn.up.norm(dim=0) ** 2).sqrt()
            sx = (x_cal.abs() * w).flatten()
            self.tx = sx.kthvalue(max(1, round((1 - rank) * sx.numel()))).values
        if threshold:
            s = self.scores(x_cal).flatten()
            self.th = s.kthvalue(max(1, round((1 - k) * s.numel()))).values

    def scores(self, x):
        ffn = self.ffn
        if isinstance(self.pq, float):  # predictor from the share pq of input channels (weighted magnitudes)
            w = (ffn.gate.norm(dim=0) ** 2 + ffn.up.norm(dim=0) ** 2).sqrt()
            if self.tx is not None:
                x = x * (x.abs() * w >= self.tx)
            else:
                x = x * top_k_mask(x.abs() * w, max(1, round(self.pq * x.shape[-1])))
        if self.pq is None or isinstance(self.pq, float):
            return (self.act(x @ ffn.gate.T) * (x @ ffn.up.T)).abs() * self.out_weight
        p, q = self.pq
        gu = (x @ p.T) @ q.T
        g, u = gu.split(ffn.width, dim=-1)
        return (self.act(g) * u).abs() * self.out_weight

    def forward(self, x, *args, **kwargs):
        shape, ffn = x.shape, self.ffn
        x = x.reshape(-1, shape[-1])
        s = self.scores(x)
        keep = s >= self.th if self.th is not None else top_k_mask(s, max(1, round(self.k * ffn.width)))
        h = self.act(x @ ffn.gate.T) * (x @ ffn.up.T) * keep
        return (h @ ffn.down.T).view(shape)


model, tok = load_model("smollm2")
ad = adapter_for(model)
ids = tokenize(tok, eval_text("wikitext2"))
inputs = dense_ffn_inputs(model, ad, tok)
H, I = model.config.hidden_size, model.config.intermediate_size

for rule in sys.argv[1].split(","):
    parts = rule.split(":")
    variant = parts[0]
    rank = float(parts[1]) if variant.startswith("in") else int(parts[1])
    cost = 2 * rank / 3 if variant.startswith("in") else rank * (H + 2 * I) / (3 * H * I)
    per_neuron = (3 - 2 * rank) / 3 if variant.startswith("in") else 1  # gate and up finish the partial sums
    k = (float(parts[3]) - cost) / per_neuron if parts[2] == "budget" else float(parts[2])
    cost_k = k * per_neuron
    t = time.perf_counter()
    undo = with_rule(model, ad, lambda i, ffn: PredictedFFN(ffn, 0 if variant == "exact" else rank, k, inputs[i],
                                                            "both" if variant.endswith("thr2") else variant.endswith("thr")))
    ppl = perplexity(model, ids, 2048, 4, progress=False)
    undo()
    row = dict(rule=variant, rank=rank, k=round(k, 4), compute=round(cost + cost_k, 4), ppl4=round(ppl, 2),
               s=round(time.perf_counter() - t, 1))
    print(json.dumps(row), flush=True)
    with open("/tmp/study/neuron_predictor.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
