"""The GPU's Triton kernels for the routed experts, run in Triton's interpreter on the CPU (float32: the
interpreter's bfloat16 tl.dot is wrong, and on a GPU bench/cuda_check.py checks bfloat16)."""

import pytest
import torch

from cmoe.moe import kernels
from cmoe.errors import CMoEError
from cmoe.moe.kernels import ACTIVATION_CODES
import cmoe.moe as moe_module
from cmoe.moe import backends
from cmoe.moe.ffn import hidden_activation as _hidden
from cmoe.moe.router import group_slots

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
# a dynamic router's empty slots never reach the Triton experts: the grouped path runs them (MoEFFN.torch_forward)
@pytest.mark.parametrize("case", [c for c in CASES if "threshold" not in c],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
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


@pytest.mark.parametrize("switches", [dict(triton_experts=True), dict(triton_experts=True, triton_shared=True),
                                      dict(triton_router=True),
                                      dict(triton_experts=True, triton_shared=True, triton_router=True)],
                         ids=["experts", "experts+shared", "router", "experts+shared+router"])
def test_moe_forward_runs_through_the_triton_kernels_where_switched_on(triton_kernels, monkeypatch, switches):
    monkeypatch.setenv("CMOE_CPU_KERNEL", "0")  # the grouped path, as on a GPU
    used = {"route": 0, "routed_experts": 0, "dense_hidden": 0}

    def counted(name):
        function = getattr(triton_kernels, name)
        return lambda *args, **kwargs: used.__setitem__(name, used[name] + 1) or function(*args, **kwargs)

    counting = type("Counting", (), {name: staticmethod(counted(name)) for name in used})
    # as on a GPU, in half precision: the backends module decides which pieces the kernels run
    monkeypatch.setattr(backends, "triton_applies", lambda x: True)
    monkeypatch.setattr(backends.kernels, "triton_kernels", lambda: counting)
    all_off = dict(triton_experts=False, triton_shared=False, triton_router=False)
    for case in (dict(act="silu", top_k=2), dict(act="gelu", gated=False, bias=True, top_k=1, routed=7)):
        moe = random_moe(**case, std=0.2)
        x = torch.randn(33, moe.hidden_size)
        with torch.no_grad():
            with moe_module.GPU.switched(**all_off):
                expected = moe(x)
            with moe_module.GPU.switched(**{**all_off, **switches}):
                got = moe(x)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()
    router_on = switches.get("triton_router", False)
    assert used == {"route": 2 * router_on, "routed_experts": 2 * switches.get("triton_experts", False),
                    "dense_hidden": 2 * switches.get("triton_shared", False)}


ROUTER_CASES = [dict(act="silu"), dict(act="gelu_pytorch_tanh", top_k=3), dict(act="gelu", gated=False, bias=True),
                dict(act="relu", gated=False, bias=True, top_k=1, routed=7), dict(act="silu", hidden=53),
                dict(act="silu", routed=20, top_k=4)]  # 20 experts: more than a 16-wide tile


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_route_kernel_chooses_and_groups_as_the_router_and_group_slots_do(triton_kernels, case):
    router = random_moe(**{"std": 0.2, **case}).router
    for tokens in (1, 70, 1500):  # 1500 tokens: several blocks of the grouping launch
        x = torch.randn(tokens, router.weight.shape[1])
        with torch.no_grad():
            probs, expected = router.select(x)
            expected_gates = router.gates(probs, expected)
            chosen, gates, order, counts = triton_kernels.route(
                x, router.weight, router.bias, router.selection_bias, router.gate_scale, router.top_k,
                ACTIVATION_CODES[router.act], router.gated, write_gates=True, block_m=16, block_k=16)
        assert torch.equal(chosen, expected)  # the same experts, in the same order (largest first)
        assert torch.allclose(gates, expected_gates, atol=1e-6), (gates - expected_gates).abs().max()
        # grouped as group_slots groups them, up to the order within an expert (atomic counts set it on a GPU)
        expected_order, expected_counts = group_slots(expected.reshape(-1), router.num_experts)
        assert torch.equal(counts.long(), expected_counts)
        for start, end in zip(expected_counts.cumsum(0) - expected_counts, expected_counts.cumsum(0)):
            assert torch.equal(order[start:end].long().sort().values, expected_order[start:end].sort().values)


@pytest.mark.parametrize("case", [dict(act="silu"), dict(act="gelu_pytorch_tanh", hidden=53),
                                  dict(act="relu", gated=False, bias=True)], ids=str)
def test_dense_hidden_matches_the_pytorch_activation(triton_kernels, case):
    shared = random_moe(**{"std": 0.2, **case}).shared
    for tokens in (3, 70):
        x = torch.randn(tokens, shared.gate_up_proj.shape[1])
        with torch.no_grad():
            expected = _hidden(torch.nn.functional.linear(x, shared.gate_up_proj), shared.width, shared.gated,
                               shared.act_fn, shared.up_bias)
            got = triton_kernels.dense_hidden(x, shared.gate_up_proj, shared.up_bias, ACTIVATION_CODES[shared.act],
                                              shared.gated, SMALL_BLOCKS)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


# Compiles the kernels for an H100 (sm_90a) as the JIT would at launch: pointers 16-byte aligned and the
# strides and sizes multiples of 16 (as in the common models). No GPU is needed to compile. The expert
# kernels' common case in both tile-shape sets, then every other branch once. Prints, per compile: whether
# it uses Hopper's tensor-core instruction (wgmma), whether its loads are pipelined (cp.async), and its
# shared memory.
_COMPILE_FOR_HOPPER = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cmoe.moe.kernels import moe_triton as m

GATE_UP = dict(x_ptr="*bf16", w_ptr="*bf16", hidden_ptr="*bf16", order_ptr="*i32", counts_ptr="*i32")
DOWN = dict(hidden_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", order_ptr="*i32", counts_ptr="*i32")
ROUTE = dict(x_ptr="*bf16", w_ptr="*bf16", selection_bias_ptr="*fp32", gate_scale_ptr="*bf16", chosen_ptr="*i64",
             counts_ptr="*i32", ranks_ptr="*i32")

def compile_for_hopper(kernel, pointers, constants, warps, stages=3):
    signature = {arg: pointers.get(arg, "constexpr" if arg in constants else "i32") for arg in kernel.arg_names}
    aligned = [arg for arg, kind in signature.items() if kind != "constexpr" and arg not in ("num_experts", "tokens")]
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 64),
                              options=dict(num_warps=warps, num_stages=stages))
    ptx = compiled.asm["ptx"]
    return dict(kernel=kernel.__name__, wgmma="wgmma.mma_async" in ptx, pipelined="cp.async" in ptx,
                shared=compiled.metadata.shared)


def tiles(blocks):
    block_m, block_n, block_k, warps, stages = blocks
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k), warps, stages


rows = []
# the common case, both tile-shape sets: a gated FFN at top-1 (the shared output added by the down kernel)
for kind, kernel, pointers, constants in (
        ("gate_up", m._gate_up_kernel, GATE_UP, dict(bias_ptr=None, gates_ptr=None, TOP_K=1, GROUPED=True,
                                                    GATED=True, HAS_BIAS=False, HAS_GATES=False, ACT=0)),
        ("down", m._down_kernel, dict(DOWN, residual_ptr="*bf16"), dict(HAS_RESIDUAL=True))):
    for blocks in (m.BLOCKS[kind], m.FEW_SLOTS_BLOCKS[kind]):
        shape, warps, stages = tiles(blocks)
        rows.append(dict(compile_for_hopper(kernel, pointers, dict(constants, EVEN_K=True, E_POW2=8, **shape), warps,
                                            stages), blocks=blocks))
# every other branch compiles too: plain FFNs with biases, gates, the other activations, top-k, uneven K
shape, warps, stages = tiles(m.BLOCKS["gate_up"])
for act in (1, 2, 3):
    rows.append(compile_for_hopper(m._gate_up_kernel, dict(GATE_UP, bias_ptr="*bf16", gates_ptr="*bf16"),
                                   dict(TOP_K=3, GROUPED=act != 3, GATED=False, HAS_BIAS=True, HAS_GATES=True,
                                        ACT=act, EVEN_K=False, E_POW2=16, **shape), warps, stages))
shape, warps, stages = tiles(m.BLOCKS["down"])
rows.append(compile_for_hopper(m._down_kernel, DOWN, dict(residual_ptr=None, HAS_RESIDUAL=False, EVEN_K=False,
                                                          E_POW2=8, **shape), warps, stages))
for constants in (dict(bias_ptr=None, TOP_K=2, GATED=True, HAS_BIAS=False, ACT=0, WRITE_GATES=True, EVEN_K=True),
                  dict(TOP_K=1, GATED=False, HAS_BIAS=True, ACT=2, WRITE_GATES=False, gates_ptr=None, EVEN_K=False)):
    pointers = dict(ROUTE, gates_ptr="*bf16", bias_ptr="*bf16")
    rows.append(compile_for_hopper(m._route_kernel, pointers, dict(constants, E_POW2=16, BLOCK_M=64, BLOCK_K=128), 4))
rows.append(compile_for_hopper(m._place_kernel, dict(chosen_ptr="*i64", ranks_ptr="*i32", counts_ptr="*i32",
                                                    order_ptr="*i32"), dict(E_POW2=8, BLOCK=1024), 4))
print(json.dumps(rows))
"""


def test_triton_kernels_compile_for_an_h100_with_pipelined_tensor_core_loops(triton_kernels):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).parents[2] / "src")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["kernel"] for row in rows] == (["_gate_up_kernel"] * 2 + ["_down_kernel"] * 2 + ["_gate_up_kernel"] * 3
                                               + ["_down_kernel"] + ["_route_kernel"] * 2 + ["_place_kernel"])
    for row in rows[:4]:
        assert row["pipelined"], row  # loads staged through shared memory while the products run
        assert row["shared"] <= 227 * 1024, row  # an H100 block's shared memory
        if row["blocks"][0] >= 64:  # wgmma takes 64-row tiles; decode's 16-row tiles use mma.sync
            assert row["wgmma"], row


def test_gpu_paths_are_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("CMOE_GPU_PATHS", raising=False)
    defaults = moe_module.GPUPaths.from_environment()
    assert defaults == moe_module.GPUPaths(counting_sort=False, triton_experts=True, triton_shared=False,
                                           triton_router=True)  # what won on the H200 (BENCHMARKS.md, issue 27)
    monkeypatch.setenv("CMOE_GPU_PATHS", "triton_shared, triton_router")
    assert moe_module.GPUPaths.from_environment() == moe_module.GPUPaths(
        counting_sort=False, triton_experts=False, triton_shared=True, triton_router=True)  # exactly those on
    for nothing in ("none", ""):
        monkeypatch.setenv("CMOE_GPU_PATHS", nothing)
        assert not any(vars(moe_module.GPUPaths.from_environment()).values())
    monkeypatch.setenv("CMOE_GPU_PATHS", "triton_experts,fast")
    with pytest.raises(CMoEError, match="names fast, which cmoe does not know") as error:
        moe_module.GPUPaths.from_environment()
    assert "\n" not in str(error.value) and "counting_sort" in str(error.value)


def test_triton_kernels_take_no_tokens(triton_kernels):
    moe = random_moe(top_k=2, std=0.2)
    router, experts, shared = moe.router, moe.experts, moe.shared
    x = torch.randn(0, moe.hidden_size)
    chosen, gates, order, counts = triton_kernels.route(x, router.weight, router.bias, router.selection_bias,
                                                        router.gate_scale, 2, 0, True, write_gates=True)
    assert chosen.shape == (0, 2) and order.numel() == 0 and counts.tolist() == [0] * router.num_experts
    out = triton_kernels.routed_experts(x, order, counts, 2, gates, experts.gate_up_proj, None, experts.down_proj, 0,
                                        True, torch.zeros_like(x))
    assert out.shape == (0, moe.hidden_size)
    assert triton_kernels.dense_hidden(x, shared.gate_up_proj, None, 0, True).shape == (0, shared.width)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_route_kernel_keeps_nan_input_in_range(triton_kernels):
    # a NaN token matches no expert's key; its slots must still land on real experts (on a GPU an index past
    # the counts would write out of bounds)
    router = random_moe(top_k=2, std=0.2).router
    x = torch.randn(20, router.weight.shape[1])
    x[3] = float("nan")
    with torch.no_grad():
        chosen, _, order, counts = triton_kernels.route(x, router.weight, router.bias, router.selection_bias,
                                                        router.gate_scale, 2, 0, True, write_gates=False)
    assert chosen.min() >= 0 and chosen.max() < router.num_experts
    assert counts.sum() == 40 and torch.equal(order.long().sort().values, torch.arange(40))


def test_gpu_switched_restores_the_switches_after_the_block():
    paths = moe_module.GPUPaths(counting_sort=True)
    with pytest.raises(RuntimeError):
        with paths.switched(triton_experts=True, counting_sort=False) as inside:
            assert inside.triton_experts and not inside.counting_sort
            raise RuntimeError("the block fails")
    assert paths == moe_module.GPUPaths(counting_sort=True)
    with pytest.raises(AttributeError):
        with paths.switched(fast=True):
            pass
