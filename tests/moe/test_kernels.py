"""The compiled CPU kernels: the same outputs as the PyTorch paths, the right one for each call, a clean fallback."""

import copy
import logging
import shutil

import pytest
import torch

from cmoe.moe import kernels
from cmoe.moe.backends import (AMX_DECODE_KERNEL_SLOTS, CPU_DECODE, CPU_PREFILL, DECODE_KERNEL_SLOTS, EAGER_DECODE, TORCH,
                                backend_for, cpu_kernels, decode_kernel_slots)
from cmoe.moe import MoEFFN
from cmoe.moe.ffn import row_hidden_activation as _row_hidden


def random_moe(act="silu", gated=True, bias=False, shared=1, routed=5, top_k=2, trained_gates=True, seed=0, hidden=32,
               width=8, std=0.5, router="representative", output_bias=False, threshold=None):
    torch.manual_seed(seed)
    moe = MoEFFN(hidden_size=hidden, expert_width=width, shared=shared, routed=routed, top_k=top_k, act=act, gated=gated,
                 bias=bias, router=router, output_bias=output_bias)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=std)
        moe.router.selection_bias.normal_(std=0.1)
        if not trained_gates:
            moe.router.gate_scale.zero_()
        if threshold is not None:
            moe.router.threshold.fill_(threshold)
            moe.router.mean_k.fill_(max(1, top_k // 2))  # about what a threshold near the median gives
    return moe.eval()


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    module = kernels.moe_cpu()
    assert module is not None, "the CPU kernels did not build on a machine with a C++ compiler"
    return module


CASES = [dict(act="silu"), dict(act="gelu_pytorch_tanh"), dict(act="gelu", gated=False, bias=True),
         dict(act="relu", gated=False, bias=True), dict(act="silu", shared=0), dict(act="silu", trained_gates=False),
         dict(act="silu", top_k=1, routed=7), dict(act="silu", hidden=53),  # 53: not a multiple of the lanes
         # whole vector steps (16 or 32 lanes), and 40 = 32 + 8: a tail; smaller weights keep the sums near 1
         dict(act="silu", hidden=160, width=40, std=0.2),
         # AMX tiles (16 rows, 32 deep): gate/up rows in whole tiles, down rows 2 tiles and 8 more
         dict(act="silu", hidden=64, width=24, std=0.2), dict(act="silu", hidden=40, width=32, std=0.2),
         # the fitted preset's layouts: a linear router, many narrow experts, an output bias
         dict(act="silu", router="linear"), dict(act="silu", router="linear", shared=0, output_bias=True),
         dict(act="gelu", gated=False, bias=True, router="linear"),
         dict(act="silu", router="linear", routed=48, top_k=2, width=2, std=0.2),
         # a per-token number of experts: slots left empty, and tokens that take one expert only
         dict(act="silu", router="linear", routed=8, top_k=2, threshold=0.0),
         dict(act="silu", router="linear", routed=8, top_k=2, threshold=100.0, shared=0)]


@pytest.fixture(params=[(True, True), (False, True), (False, False)],
                ids=["amx-where-present", "avx512-where-present", "portable"])
def products(kernel, request):
    """Each way of the kernels' arithmetic: bfloat16 products in AMX tiles, AVX-512 (each where the processor
    has it), portable."""
    amx, avx512 = request.param
    kernel.use_amx(amx)
    kernel.use_avx512(avx512)
    yield request.param
    kernel.use_amx(True)
    kernel.use_avx512(True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kernel_matches_the_pytorch_decode_path(kernel, products, case):
    moe = random_moe(**case)
    for tokens in (1, 2, 9):  # 9: experts chosen by several tokens at once
        x = torch.randn(tokens, moe.hidden_size)
        with torch.no_grad():
            assert backend_for(moe, x) == CPU_DECODE
            fast, eager = moe(x), moe.decode_rows(x)
        assert torch.allclose(fast, eager, atol=1e-5, rtol=1e-5), (fast - eager).abs().max()


def bfloat16_reference(moe, x):
    """What the kernel computes for bfloat16 weights, in float32 operations: each product's inputs (the
    layer input and the hidden activations) in bfloat16, its sums in float32, the router in float32."""
    f = copy.deepcopy(moe).float()
    in_bfloat16 = lambda t: t.to(torch.bfloat16).float()

    def hidden(part, weight, row, bias):
        return _row_hidden(weight @ row, part.width, part.gated, part.act_fn, bias)

    rows = []
    for row in x.float():
        total = torch.zeros(moe.hidden_size)
        if f.shared is not None:
            total += f.shared.down_proj @ in_bfloat16(hidden(f.shared, f.shared.gate_up_proj, row, f.shared.up_bias))
        experts, gates = f.router.choose_row(row)
        for slot, e in enumerate(experts):
            bias = None if f.experts.up_bias is None else f.experts.up_bias[e]
            h = hidden(f.experts, f.experts.gate_up_proj[e], row, bias)
            total += f.experts.down_proj[e] @ in_bfloat16(h if gates is None else h * gates[slot])
        rows.append(total if f.down_bias is None else total + f.down_bias)
    return torch.stack(rows).to(torch.bfloat16)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_bfloat16_kernel_multiplies_bfloat16_and_sums_in_float32(kernel, products, case):
    moe = random_moe(**case).to(torch.bfloat16)
    for tokens in (1, 9, 50):  # 9: blocks of 2 tokens and one of 1; 50: AMX tiles of 16 tokens, 3 and 1 at once
        x = torch.randn(tokens, moe.hidden_size).to(torch.bfloat16)
        with torch.no_grad():
            fast, want = CPU_DECODE.run(moe, x), bfloat16_reference(moe, x)
        assert fast.dtype == torch.bfloat16
        # equal but for the order of float32 sums, which can move a bfloat16 rounding by one step (2^-8)
        assert torch.allclose(fast.float(), want.float(), atol=1e-3, rtol=2 ** -8), (fast.float() - want.float()).abs().max()


def test_kernel_output_depends_on_the_chosen_experts(kernel):
    moe = random_moe(top_k=1)
    x = torch.randn(1, 32)
    with torch.no_grad():
        before = moe(x)
        chosen = moe.router.select(x)[1].item()
        moe.router.selection_bias[chosen] = -10.0  # forbid the expert it chose: the output must change
        after = moe(x)
        assert torch.allclose(after, moe.decode_rows(x), atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)


def test_kernel_is_not_used_where_it_does_not_apply(kernel, monkeypatch):
    moe = random_moe()
    assert cpu_kernels(torch.float16, moe.experts.down_proj.dtype, moe.router.act) is None
    with torch.enable_grad():  # training takes the PyTorch path, which autograd sees through
        assert backend_for(moe, torch.randn(1, 32)) == TORCH
    monkeypatch.setenv("CMOE_CPU_KERNEL", "0")
    assert kernels.moe_cpu() is None


def test_a_failed_build_falls_back_to_pytorch_with_one_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Error building extension 'cmoe_moe_cpu'\nc++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    monkeypatch.setattr(kernels, "_state", {})
    moe = random_moe()
    x = torch.randn(1, 32)
    with caplog.at_level(logging.WARNING, logger="cmoe"), torch.no_grad():
        first, second, eager = moe(x), moe(x), moe.decode_rows(x)
    assert torch.equal(first, eager) and torch.equal(first, second)
    failures = [r for r in caplog.records if "could not build" in r.getMessage()]
    assert len(failures) == 1 and "command not found" in failures[0].getMessage()


def test_each_call_takes_the_kernel_measured_fastest_for_it(kernel, monkeypatch):
    moe = random_moe(top_k=2)
    amx = kernel.uses_amx()
    assert decode_kernel_slots(kernel, torch.bfloat16) == (AMX_DECODE_KERNEL_SLOTS if amx else DECODE_KERNEL_SLOTS[torch.bfloat16])
    for amx_allowed in (True, False):
        kernel.use_amx(amx_allowed)
        for dtype in DECODE_KERNEL_SLOTS:
            slots = decode_kernel_slots(kernel, dtype)
            moe.to(dtype)
            few, many = torch.randn(slots // 2, 32, dtype=dtype), torch.randn(slots // 2 + 1, 32, dtype=dtype)
            with torch.no_grad():
                assert backend_for(moe, few) == CPU_DECODE and backend_for(moe, many) == CPU_PREFILL
    kernel.use_amx(True)
    assert decode_kernel_slots(kernel, torch.float32) == DECODE_KERNEL_SLOTS[torch.float32]  # no float32 tiles
    moe.float()
    with torch.no_grad():
        assert backend_for(moe, torch.randn(3, 32, dtype=torch.float16)) == TORCH  # no kernel: PyTorch's grouped path
        monkeypatch.setenv("CMOE_CPU_KERNEL", "0")  # without the kernels: eager decode for a few pairs only
        assert backend_for(moe, torch.randn(2, 32)) == EAGER_DECODE and backend_for(moe, torch.randn(3, 32)) == TORCH


def with_the_pytorch_path(moe, x, monkeypatch):
    monkeypatch.setenv("CMOE_CPU_KERNEL", "0")
    try:
        return moe(x)
    finally:
        monkeypatch.delenv("CMOE_CPU_KERNEL")


PREFILL_CASES = CASES + [dict(act="silu", top_k=3, routed=4), dict(act="silu", router="linear", routed=48, top_k=20, width=2),
                         dict(act="silu", router="linear", routed=48, top_k=20, width=2, threshold=0.0, shared=0)]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_prefill_kernel_matches_the_pytorch_path(kernel, products, case, monkeypatch):
    # products: SiLU * up in one AVX-512 pass where the processor has it, or ATen's operations
    moe = random_moe(**case)
    fewest = next(t for t in range(1, 300) if moe.router.expected_slots(t) > DECODE_KERNEL_SLOTS[torch.float32])
    for tokens in (fewest, 300):
        x = torch.randn(tokens, moe.hidden_size)
        with torch.no_grad():
            assert backend_for(moe, x) == CPU_PREFILL
            fast, reference = moe(x), with_the_pytorch_path(moe, x, monkeypatch)
        assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-5), (fast - reference).abs().max()


def test_prefill_kernel_silu_holds_at_extreme_inputs(kernel, products, monkeypatch):
    # projections in the thousands, where e^-x overflows or vanishes in float32, and infinities
    moe = random_moe(top_k=1, std=2.0)
    x = torch.randn(64, 32) * 300
    x[0, :4] = float("inf")
    with torch.no_grad():
        fast, reference = moe(x), with_the_pytorch_path(moe, x, monkeypatch)
    assert torch.equal(fast.isnan(), reference.isnan())
    finite = ~reference.isnan()
    assert torch.allclose(fast[finite], reference[finite], rtol=1e-5, atol=1e-2), (fast - reference)[finite].abs().max()


def routed_in_float32(moe, x):
    """The PyTorch path with the router in float32, as both kernels route bfloat16 models."""
    router = copy.deepcopy(moe.router).float()
    probs, chosen = router.select(x.float())
    gates = None if router.gates_are_one() else router.gates(probs, chosen).to(x.dtype)
    out = moe.experts(x, chosen, gates, torch.zeros_like(x) if moe.shared is None else moe.shared(x),
                      empty_slots=router.dynamic)
    return out if moe.down_bias is None else out + moe.down_bias


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_bfloat16_prefill_kernel_matches_the_pytorch_path_routed_in_float32(kernel, products, case):
    moe = random_moe(**case).to(torch.bfloat16)
    x = torch.randn(300, moe.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        assert backend_for(moe, x) == CPU_PREFILL
        fast, reference = moe(x), routed_in_float32(moe, x)
    assert fast.dtype == torch.bfloat16
    # the same roundings in the same order; the softmax and the SiLU (exp) may differ in the last bit
    assert torch.allclose(fast.float(), reference.float(), atol=1e-3, rtol=2 ** -8), (fast.float() - reference.float()).abs().max()


def test_prefill_kernel_skips_an_expert_no_token_chose(kernel, monkeypatch):
    moe = random_moe(top_k=1)
    x = torch.randn(64, 32)
    with torch.no_grad():
        moe.router.selection_bias[2] = -10.0  # expert 2 is never chosen
        assert 2 not in moe.router.select(x)[1]
        assert torch.allclose(moe(x), with_the_pytorch_path(moe, x, monkeypatch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden, width, tokens", [(200, 8, 16), (104, 32, 40)])
def test_decode_kernel_output_does_not_depend_on_the_thread_count(kernel, dtype, hidden, width, tokens):
    # 200 rows split over 3 threads leave blocks of fewer than 4 rows; 16 tokens over the experts, blocks of
    # 1 and 2 tokens. bfloat16 down rows 32 long: AMX tiles where the processor has them, 104 rows split mid-tile.
    moe = random_moe(top_k=2, hidden=hidden, width=width, std=0.2).to(dtype)
    x = torch.randn(tokens, hidden).to(dtype)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = CPU_DECODE.run(moe, x)
            torch.set_num_threads(3)
            three = CPU_DECODE.run(moe, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_float32_input_to_a_bfloat16_model_decodes_through_the_kernel(kernel):
    moe = random_moe(top_k=2).to(torch.bfloat16)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert backend_for(moe, x) == CPU_DECODE
        out, from_bfloat16 = moe(x), moe(x.to(torch.bfloat16)).float()
    assert out.dtype == torch.float32  # the input's dtype; the products still take bfloat16 inputs
    assert torch.allclose(out, from_bfloat16, rtol=2 ** -7, atol=1e-2), (out - from_bfloat16).abs().max()
