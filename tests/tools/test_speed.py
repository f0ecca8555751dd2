"""The speed benchmark's machinery (timings themselves live in bench/, not in tests)."""

import json
import platform

import pytest
import torch
from conftest import tiny_model, tokens

import cmoe
from cmoe.moe import kernels
from cmoe.tools.cli import main
from bench.fixtures import random_ffn_pair
from cmoe.tools.bench import Shape


def test_ideal_ratios_follow_the_arithmetic():
    s1a1e8 = Shape(hidden=4096, intermediate=11008, shared=1, active=1, experts=8)
    assert s1a1e8.ideal_prefill_ratio(2048) == pytest.approx(4.0, rel=0.01)  # 2 of 8 slices, plus a small router
    assert s1a1e8.ideal_prefill_ratio(2048) < 4.0
    assert s1a1e8.ideal_decode_ratio(1) == pytest.approx(4.0, rel=0.01)  # batch 1 reads 2 of 8 slices
    assert s1a1e8.ideal_decode_ratio(32) < 1.5  # a big batch touches nearly every expert
    every = Shape(hidden=64, intermediate=256, shared=2, active=6, experts=8)
    assert every.ideal_decode_ratio(1) < 1.0  # nothing saved, the router costs a little


def test_random_pair_with_every_expert_active_is_the_dense_ffn():
    dense, moe = random_ffn_pair(64, 256, cmoe.CarveConfig(shared=2, active=6, experts=8))
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert torch.allclose(moe(x), dense(x), atol=1e-5)


def test_dense_ffn_through_the_decode_kernel_gives_the_dense_output():
    from cmoe.hf.adapters import FFNWeights
    from cmoe.tools.bench import _dense_kernel_steps

    if kernels.moe_cpu() is None:
        pytest.skip("the CPU decode kernel is not built on this machine")
    dense, _ = random_ffn_pair(64, 256, cmoe.CarveConfig(shared=1, active=1, experts=4))
    weights = FFNWeights(gate=dense.gate_proj.weight, up=dense.up_proj.weight, down=dense.down_proj.weight, act="silu")
    x = torch.randn(3, 64)
    with torch.no_grad():
        [step] = _dense_kernel_steps([weights], dense.gate_proj.weight, tokens=3)
        assert torch.allclose(step(x), dense(x), atol=1e-5)


def test_cli_bench_compares_a_carved_folder_with_its_source(tmp_path, capsys):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(shared=1, active=1, experts=4), tokens(), progress=False)
    carved.save_pretrained(tmp_path / "carved")
    args = ["bench", str(tmp_path / "carved"), "--against", str(tmp_path / "dense"), "--seqlen", "16", "--batch", "1,2",
            "--repeats", "2", "--json", str(tmp_path / "bench.json")]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    # on glibc the benchmark keeps freed memory, so that page faults do not weigh on either side
    assert report["freed_memory_kept"] == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    assert report["gpu_paths"] == {"counting_sort": False, "triton_experts": True, "triton_shared": False,
                                   "triton_router": True}  # which GPU forward the numbers are of
    rows = report["rows"]
    layers = dense.config.num_hidden_layers
    assert [(r["level"], r["mode"], r.get("layers", 1)) for r in rows] == [
        ("ffn", "prefill", 1), ("model", "prefill", 1), ("ffn", "decode", 1), ("ffn", "decode", 1),
        ("ffn", "decode", layers), ("ffn", "decode", layers), ("model", "decode", 1), ("model", "decode", 1)]
    assert layers > 1
    assert all(r["ratio"] > 0 for r in rows)
    if kernels.moe_cpu() is not None:  # every-layer decode rows also time the dense FFN in cmoe's kernel
        assert all(r["ratio_same_kernel"] > 0 for r in rows if r.get("layers", 1) > 1)
    assert "dense/carved" in capsys.readouterr().out
    assert main(["bench", str(tmp_path / "dense")]) == 2
    assert "is a dense model" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_graph_timing_without_a_gpu_says_so():
    from cmoe.tools.bench import cuda_graph

    with pytest.raises(ValueError, match="CUDA graphs need a CUDA GPU"):
        cuda_graph(lambda: None)
