"""Grouping neurons into experts: shared by activation rate, routed by balanced k-means on activation patterns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cmoe.core.config import ExpertsConfig


@dataclass
class ExpertGroups:
    shared: torch.Tensor  # [S * W] neuron indices, highest activation rate first
    routed: torch.Tensor  # [E_r, W] neuron indices of each routed expert, ascending
    representatives: torch.Tensor  # [E_r] the neuron nearest each routed expert's centre
    iterations: int  # k-means rounds run


def balanced_assignment(cost: np.ndarray, capacity: int) -> np.ndarray:
    """Exact minimum-cost assignment of n points to K clusters of exactly `capacity` points each.

    Same optimum as the Jonker-Volgenant assignment on the n x n matrix with each cluster column repeated
    `capacity` times, but it works on the n x K matrix: start from a greedy balanced assignment, then cancel
    negative cycles of point moves between clusters until none is left (the optimality condition of a
    transportation problem). Each round costs O(nK + K^3) instead of the O(n^3) of the square problem.
    """
    n, k = cost.shape
    if n != k * capacity:
        raise ValueError(f"{n} points cannot fill {k} clusters of {capacity}")
    cost = np.asarray(cost, dtype=np.float64)
    assign = _greedy_assignment(cost, capacity)
    tolerance = 1e-9 * max(1.0, float(np.abs(cost).max()))
    points = np.arange(n)
    for _ in range(100 * n):  # each round strictly lowers the cost; the bound only guards against float trouble
        own = cost[points, assign]
        move_gain = cost - own[:, None]  # cost change of moving point p from its cluster to cluster b
        # best[a, b]: cheapest move of some point of cluster a into cluster b, and which point it is
        best = np.full((k, k), np.inf)
        best_point = np.zeros((k, k), dtype=np.int64)
        for a in range(k):
            members = np.flatnonzero(assign == a)
            idx = move_gain[members].argmin(axis=0)
            best[a] = move_gain[members][idx, np.arange(k)]
            best_point[a] = members[idx]
        np.fill_diagonal(best, np.inf)
        cycle = _negative_cycle(best, tolerance)
        if cycle is None:
            return assign
        moves = [(best_point[a, b], b) for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        for point, target in moves:
            assign[point] = target
    return assign


def _greedy_assignment(cost: np.ndarray, capacity: int) -> np.ndarray:
    """Cheapest (point, cluster) pairs first, skipping full clusters and placed points."""
    n, k = cost.shape
    assign = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity)
    for flat in np.argsort(cost, axis=None, kind="stable"):
        point, cluster = divmod(int(flat), k)
        if assign[point] < 0 and room[cluster] > 0:
            assign[point] = cluster
            room[cluster] -= 1
    return assign


def _negative_cycle(weight: np.ndarray, tolerance: float) -> list[int] | None:
    """A cycle of negative total weight in a dense K-node graph (Bellman-Ford from a virtual source)."""
    k = weight.shape[0]
    dist = np.zeros(k)
    parent = np.full(k, -1)
    changed = -1
    for _ in range(k):
        through = dist[:, None] + weight  # through[a, b]: reach b via a
        via = through.argmin(axis=0)
        candidate = through[via, np.arange(k)]
        better = candidate < dist - tolerance
        if not better.any():
            return None
        dist = np.where(better, candidate, dist)
        parent = np.where(better, via, parent)
        changed = int(np.flatnonzero(better)[0])
    node = changed
    for _ in range(k):  # walk back far enough to stand on the cycle
        node = int(parent[node])
    cycle, current = [node], int(parent[node])
    while current != node:
        cycle.append(current)
        current = int(parent[current])
    cycle.reverse()  # parent edges point backwards: parent[b] -> b
    return cycle


def _distances(patterns: torch.Tensor, counts: torch.Tensor, centres: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances [n, k] between binary firing patterns [tokens, n] and centres [k, tokens] with values in [0, 1].

    For a binary p, |p - c| = p + c - 2pc and (p - c)^2 = p - 2pc + c^2, so both metrics are one matmul.
    counts: [n] number of tokens on which each neuron fires.
    """
    centre_term = centres.sum(1) if metric == "l1" else (centres * centres).sum(1)
    return (counts[:, None] - 2 * (centres @ patterns).T + centre_term).clamp_min(0)


def _centres(patterns: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Mean firing pattern of each cluster: [k, tokens]."""
    one_hot = torch.nn.functional.one_hot(assign, k).T.to(patterns.dtype)  # [k, n]
    return (patterns @ one_hot.T).T / one_hot.sum(1)[:, None]


def static_groups(ranking: torch.Tensor, kept: int, expert_width: int) -> ExpertGroups:
    """The static preset's: the `kept` highest-ranked neurons always on, nothing routed, the rest left out."""
    shared = torch.sort(ranking, descending=True, stable=True).indices[:kept].cpu()
    empty = torch.empty(0, expert_width, dtype=torch.long)
    return ExpertGroups(shared, empty, torch.empty(0, dtype=torch.long), 0)


def group_neurons(marks: torch.Tensor, rate: torch.Tensor, config: ExpertsConfig) -> ExpertGroups:
    """Shared experts take the top-rate neurons; the rest are clustered into equal routed experts."""
    width = marks.shape[1]
    expert_width = config.expert_width(width)
    order = torch.sort(rate, descending=True, stable=True).indices
    shared = order[: config.shared * expert_width]
    remaining = order[config.shared * expert_width :]
    k = config.routed
    if k == 0:
        empty = torch.empty(0, expert_width, dtype=torch.long)
        return ExpertGroups(shared, empty, torch.empty(0, dtype=torch.long), 0)

    patterns = marks[:, remaining].float()  # [tokens, n]: each remaining neuron's firing pattern
    counts = patterns.sum(0)
    # Start from the k highest-rate remaining neurons, as the official code does (deterministic, no seed).
    centres = patterns[:, :k].T.clone()
    assign, iterations = None, 0
    for iterations in range(1, config.max_iters + 1):
        cost = _distances(patterns, counts, centres, config.distance).double().cpu().numpy()
        new_assign = torch.from_numpy(balanced_assignment(cost, expert_width)).to(patterns.device)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        centres = _centres(patterns, assign, k)

    distance = _distances(patterns, counts, centres, config.distance)  # [n, k]
    routed, representatives = [], []
    for c in range(k):
        members = torch.nonzero(assign == c).squeeze(1)
        neurons = remaining[members]
        representatives.append(neurons[distance[members, c].argmin()])
        routed.append(neurons.sort().values)
    return ExpertGroups(shared, torch.stack(routed), torch.stack(representatives), iterations)
