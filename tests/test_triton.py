"""The GPU's Triton kernels for the routed experts, run in Triton's interpreter on the CPU (float32: the
interpreter's bfloat16 tl.dot is wrong, and on a GPU bench/cuda_check.py checks bfloat16)."""

import pytest
import torch

from cmoe import kernels
from cmoe.kernels import ACTIVATION_CODES
from cmoe.moe import RoutedExperts, group_slots

from test_kernels import CASES, random_moe

SMALL_BLOCKS = {"gate_up": (16, 16, 16, 1, 1), "down": (16, 16, 16, 1, 1)}  # several tiles per expert


@pytest.fixture(scope="module")
def triton_kernels():
    triton = pytest.importorskip("triton")
    if not triton.knobs.runtime.interpret:
        pytest.skip("a GPU machine: bench/cuda_check.py checks the Triton kernels there, in bfloat16")
    module = kernels.triton_kernels()
    assert module is not None, "triton is installed, yet cmoe.kernels could not load its Triton kernels"
    return module


def grouped_path(moe, x):
    """The routed experts plus the shared part through the PyTorch grouped products (the reference)."""
    with torch.no_grad():
        out = moe.shared(x) if moe.shared is not None else torch.zeros_like(x)
        probs, chosen = moe.router.select(x)
        gates = None if moe.router.gates_are_one() else moe.router.gates(probs, chosen)
        return moe.experts(x, chosen, gates, out.clone()), out, chosen, gates


def through_triton(kernels, moe, x, out, chosen, gates, blocks, grouping=None):
    experts = moe.experts
    order, counts = grouping or group_slots(chosen.reshape(-1), experts.num_experts)
    with torch.no_grad():
        return kernels.routed_experts(x, order, counts, chosen.shape[1], gates, experts.gate_up_proj, experts.up_bias,
                                      experts.down_proj, ACTIVATION_CODES[experts.act], experts.gated, out, blocks)


@pytest.mark.parametrize("blocks", [SMALL_BLOCKS, None], ids=["16-blocks", "default-blocks"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_triton_kernels_match_the_grouped_path(triton_kernels, case, blocks):
    moe = random_moe(**{"std": 0.2, **case})
    for tokens in (1, 70):  # 70 tokens: experts of several 16-row tiles and of a part of one
        x = torch.randn(tokens, moe.hidden_size)
        expected, shared_out, chosen, gates = grouped_path(moe, x)
        got = through_triton(triton_kernels, moe, x, shared_out, chosen, gates, blocks)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


def test_triton_kernels_with_an_expert_nobody_chose_and_no_shared_part(triton_kernels):
    moe = random_moe(shared=0, top_k=1, routed=6, std=0.2)
    with torch.no_grad():
        moe.router.selection_bias[2] = -10.0  # expert 2 is never chosen
    x = torch.randn(50, moe.hidden_size)
    expected, _, chosen, gates = grouped_path(moe, x)
    assert not (chosen == 2).any()
    for residual in (None, torch.zeros_like(x)):
        got = through_triton(triton_kernels, moe, x, residual, chosen, gates, SMALL_BLOCKS)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


def test_counts_that_disagree_with_the_grouping_fail_the_comparison(triton_kernels):
    # the comparisons above can fail: rows given to the wrong experts change the output
    moe = random_moe(top_k=2, std=0.2)
    x = torch.randn(40, moe.hidden_size)
    expected, shared_out, chosen, gates = grouped_path(moe, x)
    order, counts = group_slots(chosen.reshape(-1), moe.experts.num_experts)
    got = through_triton(triton_kernels, moe, x, shared_out, chosen, gates, SMALL_BLOCKS, (order, counts.roll(1)))
    assert not torch.allclose(got, expected, atol=1e-3)


def test_moe_forward_runs_through_the_triton_kernels_where_they_apply(triton_kernels, monkeypatch):
    monkeypatch.setenv("CMOE_CPU_KERNEL", "0")  # the grouped path, as on a GPU
    calls = []

    def interpreted(self, x):
        calls.append(x.shape[0])
        return triton_kernels

    for case in (dict(act="silu", top_k=2), dict(act="gelu", gated=False, bias=True, top_k=1, routed=7)):
        moe = random_moe(**{"std": 0.2, **case})
        x = torch.randn(33, moe.hidden_size)
        with torch.no_grad():
            expected = moe(x)
            monkeypatch.setattr(RoutedExperts, "_triton_kernels", interpreted)
            got = moe(x)
            monkeypatch.undo()
        monkeypatch.setenv("CMOE_CPU_KERNEL", "0")
        assert calls and calls[-1] == 33
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()
