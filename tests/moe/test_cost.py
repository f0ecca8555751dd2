"""The one cost model: planning, the sparse split search, the counting and the bench's ideal ratios agree."""

import pytest
import torch
from conftest import counted_compute, tiny_model, tokens

import cmoe
from cmoe.core.sparse import splits
from cmoe.moe import cost
from cmoe.tools.bench import Shape


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("budget", [0.97, 0.75, 0.5, 0.3, 0.1])
def test_every_sparse_split_the_search_tries_spends_the_budget(gated, budget):
    found = splits(budget, gated)
    assert found
    for split in found:
        assert 0 < split.inputs <= 1 and 0 < split.neurons <= 1
        assert cost.sparse_split_share(split.inputs, split.neurons, split.complete, gated) == pytest.approx(budget)


def test_a_carved_layout_counts_what_the_cost_model_plans():
    carved = cmoe.carve_(tiny_model("llama"), cmoe.CarveConfig(budget=0.5, preset="fitted", dynamic_k=False), tokens(),
                         progress=False)
    spec = carved.config.cmoe
    planned = cost.moe_share(64, spec["expert_width"], spec["shared"], spec["experts"] - spec["shared"], True,
                             spec["router"], spec["active"])
    assert planned <= 0.5
    assert counted_compute(carved, tokens(2, 40, seed=3).reshape(-1), 40, 2)["overall"] == pytest.approx(planned, abs=1e-4)


def test_the_bench_ideal_ratios_are_the_cost_model_inverted():
    shape = Shape(hidden=4096, intermediate=11008, shared=1, active=1, experts=8)
    share = cost.moe_share(11008, 11008 // 8, 1, 7, True, "representative", 1)
    assert shape.ideal_prefill_ratio(2048) == pytest.approx(1 / share)
    assert shape.ideal_decode_ratio(1) == pytest.approx(1 / share)  # one token reads one routed expert
    linear = Shape(hidden=4096, intermediate=11008, shared=1, active=1, experts=8, router="linear")
    assert linear.ideal_prefill_ratio(2048) > shape.ideal_prefill_ratio(2048)  # half the router's rows


def test_the_sparse_cost_of_rows_read_matches_the_split_share():
    hidden, width, tokens_ = 32, 48, 10
    inputs, neurons = 0.4 * hidden * tokens_, 0.3 * width * tokens_
    counted = cost.sparse_macs(hidden, width, True, inputs, neurons, 0) / (cost.dense_macs(hidden, width, True) * tokens_)
    assert counted == pytest.approx(cost.sparse_split_share(0.4, 0.3, False, True))
    skipped = neurons * hidden * 0.6  # completed neurons read the other 60% of the inputs
    completed = cost.sparse_macs(hidden, width, True, inputs, neurons, skipped) / (cost.dense_macs(hidden, width, True) * tokens_)
    assert completed == pytest.approx(cost.sparse_split_share(0.4, 0.3, True, True))
    assert torch.tensor(completed) > torch.tensor(counted)
