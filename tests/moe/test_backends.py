"""Which forward runs a carved FFN's tokens: one choice, per FFN kind, in `cmoe.moe.backends`."""

import pytest
import torch
from conftest import tiny_model, tokens

import cmoe
from cmoe.moe import SparseFFN, kernels
from cmoe.moe.backends import BACKENDS, MASKED, SPARSE_CPU_DECODE, SPARSE_ROWS, backend_for


@pytest.fixture(scope="module")
def sparse_ffn():
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(budget=0.5), tokens(8, 64), progress=False)
    return next(m for m in carved.modules() if isinstance(m, SparseFFN))


def test_each_kind_has_a_last_backend_that_takes_everything():
    for kind, backends in BACKENDS.items():
        assert backends[-1].applies(None, torch.zeros(0)) is True, kind


def test_a_sparse_ffn_decodes_a_few_tokens_by_rows_and_runs_the_rest_masked(sparse_ffn, monkeypatch):
    few, many = torch.randn(2, 32), torch.randn(9, 32)
    with torch.no_grad():
        expected = SPARSE_CPU_DECODE if kernels.moe_cpu() is not None else SPARSE_ROWS
        assert backend_for(sparse_ffn, few) is expected
        assert backend_for(sparse_ffn, many) is MASKED
        sparse_ffn.counting = True  # counting reads the masks: the masked forward
        try:
            assert backend_for(sparse_ffn, few) is MASKED
        finally:
            sparse_ffn.counting = False
        monkeypatch.setenv("CMOE_CPU_KERNEL", "0")
        assert backend_for(sparse_ffn, few) is SPARSE_ROWS
    assert backend_for(sparse_ffn, few) is MASKED  # autograd: the masked forward


def test_every_sparse_backend_gives_the_masked_forward(sparse_ffn):
    x = torch.randn(3, 32)
    with torch.no_grad():
        masked = MASKED.run(sparse_ffn, x)
        assert torch.allclose(SPARSE_ROWS.run(sparse_ffn, x), masked, atol=1e-5)
        if kernels.moe_cpu() is not None:
            assert torch.allclose(SPARSE_CPU_DECODE.run(sparse_ffn, x), masked, atol=1e-5)
        assert sparse_ffn.down_bias is not None and sparse_ffn.down_bias.abs().sum() > 0  # the bias is in all three
