"""Per-token activation sparsity (TEAL / WINA style) instead of experts: PPL on 4 windows.

Gate and up see only the fraction `a` of input channels with the largest |x_i| * ||column i|| (of gate and up);
down sees only the fraction `b` of hidden neurons with the largest |h_j| * ||down column j||. FFN compute
(2a + b) / 3. Rules: VARIANT:a:b, VARIANT in {wina, mag} (weight-aware or plain magnitude)."""
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


class InputSparseFFN(nn.Module):
    def __init__(self, ffn, a, b, weighted, x_cal=None):
        super().__init__()
        self.ffn, self.a, self.b = ffn, a, b
        self.tx = self.th = None
        self.act = ACT2FN[ffn.act]
        cols = ffn.up.norm(dim=0) ** 2 + (0 if ffn.gate is None else ffn.gate.norm(dim=0) ** 2)
        self.in_weight = cols.sqrt() if weighted else torch.ones_like(cols)
        self.out_weight = ffn.down.norm(dim=0) if weighted else torch.ones(ffn.width)
        if x_cal is not None:  # per-layer thresholds: the calibration tokens keep a and b on average
            sx = (x_cal.abs() * self.in_weight).flatten()
            self.tx = sx.kthvalue(max(1, round((1 - a) * sx.numel()))).values if a < 1 else None
            xs = x_cal * (x_cal.abs() * self.in_weight >= self.tx) if a < 1 else x_cal
            up = xs @ ffn.up.T
            h = self.act(xs @ ffn.gate.T) * up
            sh = (h.abs() * self.out_weight).flatten()
            self.th = sh.kthvalue(max(1, round((1 - b) * sh.numel()))).values if b < 1 else None

    def forward(self, x, *args, **kwargs):
        shape, ffn = x.shape, self.ffn
        x = x.reshape(-1, shape[-1])
        if self.tx is not None:
            x = x * (x.abs() * self.in_weight >= self.tx)
        elif self.a < 1:
            x = x * top_k_mask(x.abs() * self.in_weight, round(self.a * x.shape[-1]))
        up = x @ ffn.up.T + (0 if ffn.up_bias is None else ffn.up_bias)
        h = self.act(up) if ffn.gate is None else self.act(x @ ffn.gate.T) * up
        if self.th is not None:
            h = h * (h.abs() * self.out_weight >= self.th)
        elif self.b < 1:
            h = h * top_k_mask(h.abs() * self.out_weight, round(self.b * h.shape[-1]))
        out = h @ ffn.down.T
        if ffn.down_bias is not None:
            out = out + ffn.down_bias
        return out.view(shape)


model, tok = load_model("smollm2")
ad = adapter_for(model)
ids = tokenize(tok, eval_text("wikitext2"))
layers = ad.layers(model)
inputs = dense_ffn_inputs(model, ad, tok)
def best_split(ffn, x, budget, weighted=True):
    """The (a, b) with (2a + b) / 3 = budget whose thresholded FFN has the least output error on x."""
    dense = InputSparseFFN(ffn, 1, 1, weighted)(x)
    best = None
    for share in (0.3, 0.45, 0.6, 0.75, 0.9, 1.0):
        b = min(1.0, share * budget)
        a = (3 * budget - b) / 2
        if a > 1:
            continue
        out = InputSparseFFN(ffn, a, b, weighted, x)(x)
        err = ((out - dense).norm() / dense.norm()).item()
        if best is None or err < best[0]:
            best = (err, a, b)
    print(ffn.width, budget, [round(v, 3) for v in best], flush=True)
    return best[1], best[2]


for rule in sys.argv[1].split(","):
    if rule.startswith("split"):
        budget = float(rule.split(":")[1])
        splits = [best_split(ad.read(l, model.config), inputs[i], budget) for i, l in enumerate(layers)]
        undo = with_rule(model, ad, lambda i, ffn: InputSparseFFN(ffn, *splits[i], True, inputs[i]))
        t = time.perf_counter()
        ppl = perplexity(model, ids, 2048, 4, progress=False)
        undo()
        row = dict(rule="per-layer split", budget=budget, splits=splits, ppl4=round(ppl, 2))
        print(json.dumps(row), flush=True)
        with open("/tmp/study/input_sparsity.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        continue
    variant, a, b = rule.split(":")
    a, b = float(a), float(b)
    undo = with_rule(model, ad, lambda i, ffn: InputSparseFFN(ffn, a, b, "wina" in variant,
                                                              inputs[i] if "thr" in variant else None))
    t = time.perf_counter()
    ppl = perplexity(model, ids, 2048, 4, progress=False)
    undo()
    row = dict(rule=variant, a=a, b=b, compute=round((2 * a + b) / 3, 4), ppl4=round(ppl, 2),
               s=round(time.perf_counter() - t, 1))
    print(json.dumps(row), flush=True)
    with open("/tmp/study/input_sparsity.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
