"""The builders of carved MoE FFNs (`ExpertsConfig`: paper, reference, fitted; `StaticConfig`), one FFN at a time
from its calibration inputs: choose the neurons of each expert, fill the module, fold in what is left out, fit
and balance the router, and count what the result computes."""

from __future__ import annotations

import torch

from cmoe.core.activations import activation_marks, activation_rate, ffn_activations, fluctuation
from cmoe.core.config import ExpertsConfig, StaticConfig
from cmoe.core.grouping import ExpertGroups, group_neurons, static_groups
from cmoe.core.router_fit import (balance_selection_bias, expert_load, fill_router, fit_linear_router, imbalance,
                                  set_threshold)
from cmoe.hf.adapters import FFNWeights
from cmoe.moe.module import MoEFFN


def build_experts(x: torch.Tensor, ffn: FFNWeights, config: ExpertsConfig):
    """Carve one FFN from its calibration inputs x [T, H]: the filled `MoEFFN`, what to record of it, and its
    output on x [T, H] (computed from the dense hidden activation, which it equals while gates are 1)."""
    return _build(x, ffn, config, choose_routed)


def build_static(x: torch.Tensor, ffn: FFNWeights, config: StaticConfig):
    """`build_experts` for the static preset: the kept neurons always on, nothing routed."""
    return _build(x, ffn, config, choose_static)


def _build(x: torch.Tensor, ffn: FFNWeights, config: ExpertsConfig | StaticConfig, choose):
    hidden, groups, rate = choose(x, ffn, config)
    moe = MoEFFN.from_dense(ffn, groups.shared, groups.routed, config.top_k, config.router, config.compensate)
    record = dict(shared_neurons=groups.shared.tolist(), routed_neurons=groups.routed.tolist(),
                  representatives=groups.representatives.tolist(), kmeans_iterations=groups.iterations,
                  activation_rate=[round(r, 5) for r in rate.tolist()])
    compensation = fold_left_out(moe, hidden, ffn, groups) if config.compensate else None
    chosen = None
    if moe.router is not None:
        record.update(fit_router(moe, x, hidden, ffn, groups, config))
        record.update(balance_router(moe, x.to(ffn.up.dtype), config))
        chosen = moe.router(x.to(ffn.up.dtype))[1]  # [T, k]; E marks an empty slot
    keep = neurons_used(hidden, groups, chosen)
    slots = 0 if chosen is None else int((chosen < moe.router.num_experts).sum())
    record["ffn_compute"] = round(moe.compute_share(ffn.width, len(x), slots), 4)
    out = (hidden * keep) @ ffn.down.float().T
    if ffn.down_bias is not None:
        out += ffn.down_bias.float()
    if compensation is not None:
        out += compensation
    return moe, record, out.to(x.dtype)


def choose_routed(x: torch.Tensor, ffn: FFNWeights, config: ExpertsConfig):
    """The dense hidden activation on x [T, I], the neurons of each expert (shared by activation rate, routed by
    balanced k-means on the activation patterns), and each neuron's activation rate."""
    hidden, scores = ffn_activations(x, ffn, config.activation)
    marks = activation_marks(scores, config.resolved_k_act(ffn.width))
    rate = activation_rate(marks)
    return hidden, group_neurons(marks, rate, config), rate


def choose_static(x: torch.Tensor, ffn: FFNWeights, config: StaticConfig):
    """The dense hidden activation on x [T, I], the neurons kept (ranked over all tokens, by fluctuation or by a
    mean activation), and each neuron's ranking over the strongest."""
    by_fluctuation = config.activation == "fluctuation"
    hidden, scores = ffn_activations(x, ffn, "real" if by_fluctuation else config.activation)
    ranking = fluctuation(hidden, ffn) if by_fluctuation else scores.mean(0)
    expert_width = config.expert_width(ffn.width)
    groups = static_groups(ranking, config.shared * expert_width, expert_width)
    return hidden, groups, ranking / ranking.max().clamp_min(1e-30)


def fold_left_out(moe: MoEFFN, hidden: torch.Tensor, ffn: FFNWeights, groups: ExpertGroups) -> torch.Tensor:
    """Add the mean output of the neurons no expert holds to the output bias; returns that mean [H], float32."""
    left_out = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
    left_out[groups.shared] = False
    left_out[groups.routed.reshape(-1).to(hidden.device)] = False
    compensation = hidden[:, left_out].mean(0) @ ffn.down[:, left_out].float().T
    moe.down_bias.data += compensation.to(moe.down_bias.dtype)
    return compensation


def fit_router(moe: MoEFFN, x: torch.Tensor, hidden: torch.Tensor, ffn: FFNWeights, groups: ExpertGroups,
               config: ExpertsConfig) -> dict:
    """Fill the router: the representatives' rows, or a linear router fitted to the experts' output norms (with a
    per-token number of experts where the config asks); what to record of the fit."""
    if config.router != "linear":
        fill_router(moe.router, ffn, groups.representatives, config.normalise_router)
        return {}
    fit = fit_linear_router(moe.router, x, hidden, ffn.down, groups.routed)
    if config.dynamic_k and config.active < config.routed:  # every expert active: nothing to choose
        fit["threshold"] = set_threshold(moe.router, x.to(ffn.up.dtype), config.calibrated_k)
    return dict(router_fit=fit)


def balance_router(moe: MoEFFN, x: torch.Tensor, config: ExpertsConfig) -> dict:
    """Set the selection bias so that the routed experts get equal load on x (where the config asks); the loads
    before and after."""
    probs = moe.router.probabilities(x)
    before = expert_load(probs, moe.router.selection_bias, config.active)
    if config.balance:
        moe.router.selection_bias.copy_(balance_selection_bias(probs, config.active, config.balance_steps))
    after = expert_load(probs, moe.router.selection_bias, config.active)
    return dict(load_before=before.tolist(), load_after=after.tolist(), imbalance_before=imbalance(before),
                imbalance_after=imbalance(after), selection_bias=moe.router.selection_bias.tolist())


def neurons_used(hidden: torch.Tensor, groups: ExpertGroups, chosen: torch.Tensor | None) -> torch.Tensor:
    """Which neurons each token uses [T, I]: the shared ones and those of its chosen experts (`chosen` [T, k],
    E marking an empty slot; None where nothing is routed)."""
    keep = torch.zeros(hidden.shape, dtype=torch.bool, device=hidden.device)
    keep[:, groups.shared] = True
    if chosen is None:
        return keep
    # an empty slot's neurons are a column past the FFN's, dropped after the scatter
    expert_width = groups.routed.shape[1]
    table = torch.cat([groups.routed, groups.routed.new_full((1, expert_width), hidden.shape[1])]).to(hidden.device)
    keep = torch.cat([keep, keep.new_zeros(len(hidden), 1)], dim=1)
    return keep.scatter_(1, table[chosen].reshape(len(hidden), -1), True)[:, :-1]
