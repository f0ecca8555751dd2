import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cmoe.core.presets import CarveConfig
from cmoe.core.grouping import balanced_assignment, group_neurons


@pytest.mark.parametrize("n,k,seed", [(6, 2, 0), (12, 3, 1), (40, 5, 2), (64, 8, 3), (120, 4, 4)])
def test_balanced_assignment_is_exact(n, k, seed):
    rng = np.random.default_rng(seed)
    cost = rng.random((n, k)) * rng.integers(1, 50, size=(1, k))
    capacity = n // k
    assign = balanced_assignment(cost, capacity)
    assert np.bincount(assign, minlength=k).tolist() == [capacity] * k
    rows, cols = linear_sum_assignment(np.repeat(cost, capacity, axis=1))  # Jonker-Volgenant on the square problem
    assert cost[np.arange(n), assign].sum() == pytest.approx(cost[rows, cols // capacity].sum(), rel=1e-12)


def test_balanced_assignment_beats_greedy_on_a_trap():
    # Greedy puts point 0 in cluster 0 (cost 0), forcing point 1 to pay 100; the optimum swaps them.
    cost = np.array([[0.0, 1.0], [0.5, 100.0]])
    assert balanced_assignment(cost, 1).tolist() == [1, 0]


def test_group_neurons_recovers_planted_clusters():
    # 4 routed groups of 8 neurons: neurons of a group fire on the same tokens.
    torch.manual_seed(0)
    tokens, groups, width = 400, 4, 8
    topic = torch.randint(0, groups, (tokens,))
    marks = torch.zeros(tokens, groups * width, dtype=torch.bool)
    for g in range(groups):
        marks[topic == g, g * width : (g + 1) * width] = True
    marks ^= torch.rand(marks.shape) < 0.02  # a little noise
    shared_marks = torch.rand(tokens, width) < 0.9  # one always-busy group becomes the shared expert
    marks = torch.cat([shared_marks, marks], dim=1)
    rate = marks.float().mean(0)
    result = group_neurons(marks, rate, CarveConfig(shared=1, active=1, experts=5))
    assert sorted(result.shared.tolist()) == list(range(width))
    found = sorted(sorted(expert) for expert in result.routed.tolist())
    planted = [list(range(width + g * width, width + (g + 1) * width)) for g in range(groups)]
    assert found == planted


def test_width_not_divisible_is_a_clear_error():
    marks = torch.zeros(10, 30, dtype=torch.bool)
    with pytest.raises(ValueError, match="cannot split equally"):
        group_neurons(marks, marks.float().mean(0), CarveConfig(shared=1, active=1, experts=8))
