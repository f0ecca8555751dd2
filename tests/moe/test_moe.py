from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cmoe.moe.experts as experts_module
from cmoe.moe import MoEFFN
from cmoe.moe.router import group_slots


def random_moe(gated=True, bias=False, shared=1, routed=5, top_k=2, seed=0):
    torch.manual_seed(seed)
    moe = MoEFFN(hidden_size=16, expert_width=4, shared=shared, routed=routed, top_k=top_k, act="silu",
                 gated=gated, bias=bias)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_()
        moe.router.gate_scale.normal_()  # non-trivial gates
        moe.router.selection_bias.normal_(std=0.1)
    return moe


def naive_forward(moe: MoEFFN, x):
    """Token by token, expert by expert: the definition the vectorised forward must match."""
    out = []
    for token in x:
        y = moe.shared(token[None])[0] if moe.shared is not None else torch.zeros_like(token)
        weights, chosen = moe.router(token[None])
        for w, e in zip(weights[0], chosen[0]):
            proj = moe.experts.gate_up_proj[e] @ token
            if moe.experts.gated:
                gate, up = proj.split(moe.experts.width)
                hidden = torch.nn.functional.silu(gate) * up
            else:
                hidden = torch.nn.functional.silu(proj + moe.experts.up_bias[e])
            y = y + w * (moe.experts.down_proj[e] @ hidden)
        if moe.down_bias is not None:
            y = y + moe.down_bias
        out.append(y)
    return torch.stack(out)


def test_vectorised_forward_matches_naive():
    for gated, bias in [(True, False), (False, True)]:
        moe = random_moe(gated, bias)
        x = torch.randn(37, 16)
        with torch.no_grad():
            assert torch.allclose(moe(x), naive_forward(moe, x), atol=1e-4, rtol=1e-4)


def test_training_free_forward_skips_gates_and_still_matches_naive():
    moe = random_moe(top_k=3)
    x = torch.randn(37, 16)
    with torch.no_grad():
        moe.router.gate_scale.zero_()
        assert moe.router.gates_are_one()
        assert torch.allclose(moe(x), naive_forward(moe, x), atol=1e-4, rtol=1e-4)


def test_few_token_decode_path_matches_naive():
    for gated, bias, shared in [(True, False, 1), (False, True, 1), (True, False, 0)]:
        moe = random_moe(gated, bias, shared=shared)
        for tokens in (1, 2):  # 2 and 4 (token, expert) pairs: the CPU decode path
            x = torch.randn(tokens, 16)
            with torch.no_grad():
                assert torch.allclose(moe(x), naive_forward(moe, x), atol=1e-4, rtol=1e-4)


def test_decode_path_notices_gate_scales_changed_in_place():
    moe = random_moe(top_k=1)
    x = torch.randn(1, 16)
    with torch.no_grad():
        moe.router.gate_scale.zero_()  # training-free gates: the decode path skips the product
        ones = moe(x)
        assert torch.allclose(ones, naive_forward(moe, x), atol=1e-5)
        moe.router.gate_scale.fill_(3.0)  # as an optimiser step would: the cached "all ones" must not stick
        scaled = moe(x)
        assert torch.allclose(scaled, naive_forward(moe, x), atol=1e-5)
        assert not torch.allclose(scaled, ones, atol=1e-3)


def test_autograd_path_matches_inference_path():
    moe = random_moe()
    x = torch.randn(3, 11, 16)
    with torch.no_grad():
        inference = moe(x)
    training = moe(x)
    assert torch.allclose(training, inference, atol=1e-5)
    training.sum().backward()
    assert moe.router.gate_scale.grad is not None and moe.experts.down_proj.grad.abs().sum() > 0


class _ScalarReads(TorchDispatchMode):
    """Records reads of tensor values by the host: `.tolist()`, `.item()`, `int(t)`, `if t:` and the like."""

    def __init__(self):
        super().__init__()
        self.reads = []
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("_local_scalar_dense"):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "item"):  # these copy out without going through the dispatcher
            original = self._saved[name] = getattr(torch.Tensor, name)

            def spy(tensor, *args, _name=name, _original=original, **kwargs):
                self.reads.append(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, spy)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def test_inference_forward_has_no_host_sync(monkeypatch):
    monkeypatch.setenv("CMOE_CPU_KERNEL", "0")  # the grouped path, as on a GPU
    moe = random_moe()
    x = torch.randn(64, 16)
    with torch.no_grad():
        moe(x)  # the first call may read gate_scale once to learn whether every gate is 1 (cached after)
        with _ScalarReads() as mode:
            moe(x)
    assert mode.reads == []


def test_host_sync_detector_sees_a_sync():
    moe = random_moe()
    with _ScalarReads() as mode:  # grad enabled: the looped fallback reads the group sizes on the host
        moe(torch.randn(8, 16))
    assert mode.reads


def test_counting_sort_groups_slots_as_the_stable_sort_does():
    generator = torch.Generator().manual_seed(0)
    cases = [torch.randint(0, 8, (300,), generator=generator), torch.tensor([5, 5, 1, 5, 1]),  # experts left empty
             torch.zeros(0, dtype=torch.long)]
    for flat in cases:
        order, counts = group_slots(flat, 8, counting=False)
        counted_order, counted = group_slots(flat, 8, counting=True)
        assert torch.equal(counted_order, order) and torch.equal(counted, counts)
        assert torch.equal(counts, torch.bincount(flat, minlength=8))


def test_forward_with_the_counting_sort_matches_naive_without_a_host_sync(monkeypatch):
    monkeypatch.setattr(experts_module, "group_slots", partial(group_slots, counting=True))  # the GPU's grouping
    monkeypatch.setenv("CMOE_CPU_KERNEL", "0")  # and its grouped products
    moe = random_moe(top_k=2)
    x = torch.randn(37, 16)
    with torch.no_grad():
        assert torch.allclose(moe(x), naive_forward(moe, x), atol=1e-4, rtol=1e-4)
        with _ScalarReads() as mode:
            moe(x)
    assert mode.reads == []


def test_inference_forward_traces_as_one_graph_for_torch_compile(monkeypatch):
    # The CPU kernels are opaque to torch.compile, so a compiled forward takes the grouped path instead, which
    # traces as one graph in bfloat16: fullgraph=True fails on any graph break. The "eager" backend checks the
    # capture without generating code. The reference is the same path run eagerly.
    monkeypatch.setenv("CMOE_CPU_KERNEL", "0")
    torch._dynamo.reset()
    moe = random_moe(top_k=2).eval().to(torch.bfloat16)
    x = torch.randn(40, 16).to(torch.bfloat16)
    compiled = torch.compile(moe, backend="eager", fullgraph=True)
    with torch.no_grad():
        for rows in (x, x[:2]):  # a prefill and a decode-sized call
            got, want = compiled(rows).float(), moe(rows).float()
            # bfloat16 sums of terms near 30 round differently when traced: a step or two at that scale
            assert torch.allclose(got, want, rtol=2 ** -6, atol=2 ** -6 * want.abs().max().item())


def test_float32_forward_compiles_with_the_looped_products(monkeypatch):
    # traced, grouped_mm takes bfloat16 only (torch 2.13): float32 runs the looped products, which read the
    # group sizes on the host (a graph break), rather than failing
    monkeypatch.setenv("CMOE_CPU_KERNEL", "0")
    torch._dynamo.reset()
    moe = random_moe(top_k=2).eval()
    x = torch.randn(40, 16)
    compiled = torch.compile(moe, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), moe(x), atol=1e-5, rtol=1e-5)
