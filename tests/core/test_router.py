"""The training-free load-balancing pass."""

import torch

from cmoe.core.router_fit import balance_selection_bias, expert_load, imbalance


def _skewed_probs(tokens=4000, experts=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator) + torch.linspace(0, 2, experts)  # later experts favoured
    return logits.softmax(-1)


def test_balancing_evens_out_a_skewed_load():
    probs = _skewed_probs()
    zero = torch.zeros(8)
    before = imbalance(expert_load(probs, zero, 2))
    bias = balance_selection_bias(probs, top_k=2)
    after = imbalance(expert_load(probs, bias, 2))
    assert before > 1.5
    assert after < 1.05
    assert bias[0] > bias[-1]  # the favoured expert is pushed down


def test_balancing_keeps_zero_bias_when_the_load_is_already_even():
    probs = torch.full((800, 4), 0.25) + 1e-3 * torch.eye(4).repeat(200, 1)  # each expert on top for a quarter
    bias = balance_selection_bias(probs, top_k=1)
    assert torch.equal(bias, torch.zeros(4))
