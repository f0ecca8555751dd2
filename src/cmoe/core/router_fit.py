"""Building the router analytically, and a training-free load-balancing pass for its selection bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmoe.hf.adapters import FFNWeights
from cmoe.moe.router import Router


def router_rows(ffn: FFNWeights, representatives: torch.Tensor, normalise: bool):
    """Router weight rows ([gate rows; up rows] of the representative neurons) and bias (plain FFNs)."""
    up = ffn.up[representatives]
    rows = up if ffn.gate is None else torch.cat([ffn.gate[representatives], up])
    if normalise:
        rows = F.normalize(rows.float(), dim=-1).to(rows.dtype)
    bias = None if ffn.up_bias is None else ffn.up_bias[representatives]
    return rows, bias


def expert_load(probs: torch.Tensor, bias: torch.Tensor, top_k: int) -> torch.Tensor:
    """Fraction of routed token slots each expert receives: float [E], sums to 1."""
    chosen = (probs + bias).topk(top_k, dim=-1).indices
    counts = torch.bincount(chosen.reshape(-1), minlength=probs.shape[-1]).float()
    return counts / counts.sum()


def imbalance(load: torch.Tensor) -> float:
    """Max load over mean load: 1.0 is perfectly balanced."""
    return float(load.max() / load.mean())


def balance_selection_bias(probs: torch.Tensor, top_k: int, steps: int = 300, patience: int = 40) -> torch.Tensor:
    """A per-expert bias that evens out the load on these tokens, DeepSeek-V3 style, without training.

    Each step nudges overloaded experts' bias down and underloaded ones' up by a shrinking step; the
    bias with the smallest max/mean load seen is kept. It stops after `steps`, or once `patience` steps
    in a row found nothing better. probs: [T, E] router softmax on calibration tokens.
    """
    num_experts = probs.shape[-1]
    bias = torch.zeros(num_experts, device=probs.device)
    best, best_imbalance, since_best = bias.clone(), float("inf"), 0
    step = 1.0 / num_experts
    for _ in range(steps):
        load = expert_load(probs, bias, top_k)
        score = imbalance(load)
        if score < best_imbalance:
            best, best_imbalance, since_best = bias.clone(), score, 0
        elif (since_best := since_best + 1) >= patience:
            break
        bias -= step * torch.sign(load - 1.0 / num_experts)
        step *= 0.97
    return best


def expert_output_norms(hidden: torch.Tensor, down: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """The norm of each routed expert's output on each token, [T, E], from the hidden activation [T, I]: per
    expert |h_e D_e^T|^2 = h_e (D_e^T D_e) h_e^T, through the W x W Gram matrix rather than the H-wide output."""
    norms = []
    for neurons in routed.to(hidden.device):
        column = down[:, neurons].float()
        h = hidden[:, neurons]
        norms.append(((h @ (column.T @ column)) * h).sum(-1).clamp_min(0).sqrt())
    return torch.stack(norms, dim=-1)


def fit_linear_router(router: Router, x: torch.Tensor, hidden: torch.Tensor, down: torch.Tensor, routed: torch.Tensor,
                      ridge: float = 1e-4) -> dict:
    """Fit the linear router in closed form: ridge regression of each token's expert output norms, scaled to unit
    length over the experts (only their order matters), on the FFN input [T, H] with an intercept. The ridge
    is relative to the inputs' mean square. Returns the fit's R^2 on these tokens, for the record."""
    norms = expert_output_norms(hidden, down, routed)
    target = norms / norms.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    inputs = torch.cat([x.float(), torch.ones(len(x), 1, device=x.device)], dim=1)
    gram = (inputs.T @ inputs).double()
    gram += ridge * gram.diagonal()[:-1].mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram, (inputs.T @ target).double()).float()  # [H + 1, E]
    router.weight.data.copy_(solution[:-1].T)
    router.bias.data.copy_(solution[-1])
    residual = (target - inputs @ solution).detach()
    r2 = 1 - float(residual.pow(2).sum() / (target - target.mean(0)).detach().pow(2).sum().clamp_min(1e-30))
    return dict(r2=round(r2, 4))


@torch.no_grad()
def set_threshold(router: Router, x: torch.Tensor, mean_experts: float) -> float:
    """Set a linear router's threshold so that tokens take `mean_experts` routed experts on average on x
    [T, H] (each at least one, at most top_k): bisection on the threshold, the mean count being monotone.
    Returns the threshold."""
    top = router.scores(x).float().topk(router.top_k, dim=-1).values  # [T, top_k], descending

    def mean_count(threshold: float) -> float:
        count = (top >= threshold).sum(-1).clamp_min(1)
        return float(count.float().mean())

    low, high = float(top.min()) - 1.0, float(top.max()) + 1.0  # mean_count(low) = top_k, mean_count(high) = 1
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_count(middle) > mean_experts else (low, middle)
    router.threshold.fill_(high)
    router.mean_k.fill_(mean_experts)
    return high


def fill_router(router: Router, ffn: FFNWeights, representatives: torch.Tensor, normalise: bool) -> None:
    rows, bias = router_rows(ffn, representatives, normalise)
    router.weight.data.copy_(rows)
    if bias is not None:
        router.bias.data.copy_(bias)
