"""Triton kernels for the MoE FFN on a GPU: the routed experts in two launches, the router in two more.

The grouped path (cmoe.moe.RoutedExperts) gathers the tokens into expert order, runs the gate/up product,
the activation and the down product as grouped GEMMs, and puts the rows back in token order; each step
writes its [slots, ...] result to memory and the next reads it back. Here:

- `_gate_up_kernel`: a program takes a tile of BLOCK_M slots of one expert and BLOCK_N of its neurons. It
  loads those slots' token rows straight from x (the gather), runs the gate and up products side by side,
  and writes act(gate) * up, times the slot's gate where gates are given. The [slots, 2W] projection never
  reaches memory.
- `_down_kernel`: the expert's down product for the same tiles, each row written to its slot's place in
  token order (slot = token * k + j). With one expert per token that place is the token's row, and the
  shared part's output is added on the way; with k experts the k rows of a token are summed afterwards.
- `dense_hidden`: the first kernel with one expert that every token chose: the shared part's (a dense
  FFN's) hidden rows in one launch.
- `route`: the router (scores, softmax, top-k, gates) in one launch, which also counts each slot into its
  expert with an atomic add that gives the slot its rank there; a second launch puts each slot at its
  expert's start plus its rank, which groups the slots by expert.

Tiles: expert e's slots, rows start[e] ... of the grouped order, are cut into ceil(count[e] / BLOCK_M)
tiles; each program works the starts and tile numbers out from the counts. The grid has room for the most
tiles any routing can give (ceil(S / BLOCK_M) + E - 1), so launching needs no host sync (CUDA graphs
work), and a program past the last tile returns at once.

Used for bfloat16 and float16 on CUDA (tl.dot would take float32 as TF32 there), by default where Triton
is installed (cmoe.moe.GPU). The tests run these
kernels in Triton's interpreter on the CPU, in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for each kernel; FEW_SLOTS_BLOCKS below this many
# slots (decode), where a 128-row tile would be mostly masked off. The fastest of those bench/cuda_tiles.py
# tried on an H200 (7B-shaped FFN: prefill at 8,192 tokens, decode at batch 1 through 32 layers).
BLOCKS = {"gate_up": (128, 128, 64, 8, 3), "down": (128, 256, 64, 8, 3)}
FEW_SLOTS = 256
FEW_SLOTS_BLOCKS = {"gate_up": (16, 32, 128, 4, 4), "down": (16, 32, 128, 4, 4)}

@triton.jit
def _activation(v, ACT: tl.constexpr):
    """ACT as in cmoe.kernels.ACTIVATION_CODES: 0 SiLU, 1 GELU, 2 GELU (tanh form), 3 ReLU."""
    if ACT == 0:
        return v * tl.sigmoid(v)
    elif ACT == 1:
        return 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        return v * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(t)) == sigmoid(2t)
    else:
        return tl.maximum(v, 0.0)


@triton.jit
def _program_tile(counts_ptr, num_experts, columns_in_all, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  E_POW2: tl.constexpr):
    """This program's tile: its expert (num_experts or more when the tile is past the last), its rows of the
    grouped order and its columns, each with a mask. The experts' starts and tile counts are prefix sums of
    `counts`, worked out here rather than in launches of their own. Neighbouring programs take the same
    rows' other columns, so the rows they read come from L2."""
    column_tiles = tl.cdiv(columns_in_all, BLOCK_N)
    tile, column_tile = tl.program_id(0) // column_tiles, tl.program_id(0) % column_tiles
    experts = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    tiles = tl.cdiv(counts, BLOCK_M)
    tile_ends = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)  # experts whose tiles all come before this one
    this = experts == expert
    count = tl.sum(tl.where(this, counts, 0), axis=0)
    first_tile = tl.sum(tl.where(this, tile_ends - tiles, 0), axis=0)
    start = tl.sum(tl.where(this, tl.cumsum(counts, axis=0) - counts, 0), axis=0)
    rows = start + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, rows, rows < start + count, columns, columns < columns_in_all


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, bias_ptr, gates_ptr, hidden_ptr, order_ptr, counts_ptr, num_experts, hidden_size,
                    width, stride_x, stride_we, stride_wn, stride_hidden, TOP_K: tl.constexpr, GROUPED: tl.constexpr,
                    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATES: tl.constexpr, ACT: tl.constexpr,
                    EVEN_K: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    expert, rows, row_ok, columns, column_ok = _program_tile(counts_ptr, num_experts, width, BLOCK_M, BLOCK_N, E_POW2)
    if expert >= num_experts:
        return
    if GROUPED:
        slots = tl.load(order_ptr + rows, mask=row_ok, other=0)
    else:  # one expert, every token in order
        slots = tl.where(row_ok, rows, 0)
    tokens = (slots // TOP_K).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_x + ks[None, :]
    # the weight tile transposed, [BLOCK_K, BLOCK_N]: rows of gate_up_proj[expert] are neurons
    gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + columns[None, :] * stride_wn + ks[:, None]
    up_offset = width * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, hidden_size, BLOCK_K):
        if EVEN_K:  # rows past the expert's slots read token 0's row (slot 0), never stored
            x_tile = tl.load(x_ptrs)
            gate_tile = tl.load(gate_ptrs, mask=column_ok[None, :], other=0.0)
        else:
            k_ok = k + ks < hidden_size
            x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            gate_tile = tl.load(gate_ptrs, mask=k_ok[:, None] & column_ok[None, :], other=0.0)
        acc = tl.dot(x_tile, gate_tile, acc)
        if GATED:
            if EVEN_K:
                up_tile = tl.load(gate_ptrs + up_offset, mask=column_ok[None, :], other=0.0)
            else:
                up_tile = tl.load(gate_ptrs + up_offset, mask=k_ok[:, None] & column_ok[None, :], other=0.0)
            acc_up = tl.dot(x_tile, up_tile, acc_up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * width + columns, mask=column_ok, other=0.0).to(tl.float32)[None, :]
    hidden = _activation(acc, ACT)
    if GATED:
        hidden = hidden * acc_up
    if HAS_GATES:  # the gate scales the expert's output; down is linear, so it scales the hidden rows
        hidden = hidden * tl.load(gates_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden + columns[None, :]
    tl.store(out_ptrs, hidden.to(hidden_ptr.dtype.element_ty), mask=row_ok[:, None] & column_ok[None, :])


@triton.jit
def _down_kernel(hidden_ptr, w_ptr, residual_ptr, out_ptr, order_ptr, counts_ptr, num_experts, hidden_size, width,
                 stride_hidden, stride_we, stride_wn, stride_out, HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
                 E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, rows, row_ok, columns, column_ok = _program_tile(counts_ptr, num_experts, hidden_size, BLOCK_M, BLOCK_N,
                                                             E_POW2)
    if expert >= num_experts:
        return
    ks = tl.arange(0, BLOCK_K)
    hidden_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden + ks[None, :]
    # down_proj[expert] is [hidden_size, width]; its tile transposed, [BLOCK_K, BLOCK_N]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + columns[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, width, BLOCK_K):
        if EVEN_K:
            hidden_tile = tl.load(hidden_ptrs, mask=row_ok[:, None], other=0.0)
            w_tile = tl.load(w_ptrs, mask=column_ok[None, :], other=0.0)
        else:
            k_ok = k + ks < width
            hidden_tile = tl.load(hidden_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=k_ok[:, None] & column_ok[None, :], other=0.0)
        acc = tl.dot(hidden_tile, w_tile, acc)
        hidden_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    slots = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    place = slots[:, None] * stride_out + columns[None, :]  # the slot's row in token order
    mask = row_ok[:, None] & column_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + place, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + place, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _route_kernel(x_ptr, w_ptr, bias_ptr, selection_bias_ptr, gate_scale_ptr, chosen_ptr, gates_ptr, counts_ptr,
                  ranks_ptr, tokens, hidden_size, num_experts, stride_x, TOP_K: tl.constexpr, GATED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, WRITE_GATES: tl.constexpr, EVEN_K: tl.constexpr,
                  E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The router for BLOCK_M tokens: scores |act(g_r . x) * (u_r . x)| (float32 sums), softmax, top-k of
    the probabilities plus the selection bias, and each chosen expert's gate 1 + p * gate_scale. Each
    (token, expert) slot also takes a rank among its expert's slots, counting them in `counts`."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    experts = tl.arange(0, E_POW2)  # E_POW2 >= 16: a tensor-core product is at least 16 wide
    expert_ok = experts < num_experts
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tl.where(row_ok, rows, 0).to(tl.int64)[:, None] * stride_x + ks[None, :]
    w_ptrs = w_ptr + tl.where(expert_ok, experts, 0)[None, :] * hidden_size + ks[:, None]  # [BLOCK_K, E_POW2]
    up_offset = num_experts * hidden_size
    acc = tl.zeros((BLOCK_M, E_POW2), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, E_POW2), dtype=tl.float32)
    for k in range(0, hidden_size, BLOCK_K):
        if EVEN_K:
            x_tile = tl.load(x_ptrs)
            w_tile = tl.load(w_ptrs)
        else:
            k_ok = k + ks < hidden_size
            x_tile = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc)
        if GATED:
            if EVEN_K:
                up_tile = tl.load(w_ptrs + up_offset)
            else:
                up_tile = tl.load(w_ptrs + up_offset, mask=k_ok[:, None], other=0.0)
            acc_up = tl.dot(x_tile, up_tile, acc_up)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    score = _activation(acc, ACT)
    if GATED:
        score = score * acc_up
    score = tl.where(expert_ok[None, :], tl.abs(score), float("-inf"))
    score = tl.exp(score - tl.max(score, axis=1)[:, None])
    probs = score / tl.sum(score, axis=1)[:, None]
    key = probs + tl.load(selection_bias_ptr + experts, mask=expert_ok, other=0.0)[None, :]
    key = tl.where(expert_ok[None, :], key, float("-inf"))
    for j in tl.static_range(TOP_K):  # the k largest keys, largest first (ties: the lower expert)
        best = tl.max(key, axis=1)
        chosen = tl.min(tl.where(key == best[:, None], experts[None, :], E_POW2), axis=1)
        chosen = tl.minimum(chosen, num_experts - 1)  # a NaN score matches no key: keep the index in range
        is_chosen = experts[None, :] == chosen[:, None]
        tl.store(chosen_ptr + rows * TOP_K + j, chosen.to(chosen_ptr.dtype.element_ty), mask=row_ok)
        rank = tl.atomic_add(counts_ptr + chosen, 1, mask=row_ok)  # the count before this slot's
        tl.store(ranks_ptr + rows * TOP_K + j, rank, mask=row_ok)
        if WRITE_GATES:
            p = tl.sum(tl.where(is_chosen, probs, 0.0), axis=1)
            gate = 1.0 + p * tl.load(gate_scale_ptr + chosen).to(tl.float32)
            tl.store(gates_ptr + rows * TOP_K + j, gate.to(gates_ptr.dtype.element_ty), mask=row_ok)
        key = tl.where(is_chosen, float("-inf"), key)


@triton.jit
def _place_kernel(chosen_ptr, ranks_ptr, counts_ptr, order_ptr, slots, num_experts, E_POW2: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Groups the slots by expert: slot s goes to its expert's start plus its rank there."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = index < slots
    expert = tl.load(chosen_ptr + index, mask=inside, other=0)
    experts = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    starts = tl.cumsum(counts, axis=0) - counts
    start = tl.sum(tl.where(expert[:, None] == experts[None, :], starts[None, :], 0), axis=1)
    place = start + tl.load(ranks_ptr + index, mask=inside, other=0)
    tl.store(order_ptr + place, index.to(order_ptr.dtype.element_ty), mask=inside)


def route(x: torch.Tensor, weight, bias, selection_bias, gate_scale, top_k: int, act_code: int, gated: bool,
          write_gates: bool, block_m: int = 64, block_k: int = 128):
    """The router, and the slots grouped by expert, in two launches: chosen [T, k] (int64, as
    `cmoe.moe.Router` chooses, its sums and softmax in float32), gates [T, k] in x's dtype (None unless
    `write_gates`), and (order, counts) as `routed_experts` takes them.

    An expert's slots come in the order their atomic counts gave them, which varies from run to run; the
    output does not, since every slot's row is worked out on its own and written to its token's place."""
    tokens, hidden_size = x.shape
    num_experts, slots = gate_scale.shape[0], tokens * top_k
    x, weight = x.contiguous(), weight.contiguous()
    chosen = torch.empty(tokens, top_k, dtype=torch.long, device=x.device)
    gates = torch.empty(tokens, top_k, dtype=x.dtype, device=x.device) if write_gates else None
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    ranks = torch.empty(slots, dtype=torch.int32, device=x.device)
    order = torch.empty(slots, dtype=torch.int32, device=x.device)
    if tokens == 0:  # the kernels would read x's first row
        return chosen, gates, order, counts
    experts_pow2 = triton.next_power_of_2(num_experts)
    _route_kernel[(triton.cdiv(tokens, block_m),)](
        x, weight, bias, selection_bias, gate_scale, chosen, gates, counts, ranks, tokens, hidden_size, num_experts,
        x.stride(0), TOP_K=top_k, GATED=gated, HAS_BIAS=bias is not None, ACT=act_code, WRITE_GATES=write_gates,
        EVEN_K=hidden_size % block_k == 0, E_POW2=max(16, experts_pow2), BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=4)
    block = 1024
    _place_kernel[(triton.cdiv(slots, block),)](chosen, ranks, counts, order, slots, num_experts,
                                                E_POW2=experts_pow2, BLOCK=block, num_warps=4)
    return chosen, gates, order, counts


def routed_experts(x: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, top_k: int, gates, gate_up_proj,
                   up_bias, down_proj, act_code: int, gated: bool, residual, blocks: dict | None = None) -> torch.Tensor:
    """The routed experts' output for x [T, H] plus `residual` [T, H] (the shared part's output, or None).

    order, counts: the (token, expert) slots grouped by expert, as `cmoe.moe.group_slots` or `route` give
    them; gates: [T, k] or None while every gate is 1; gate_up_proj [E, 2W or W, H], up_bias [E, W] or
    None, down_proj [E, H, W]. `blocks` overrides BLOCKS (for timing other tile shapes).
    """
    tokens, hidden_size = x.shape
    num_experts, width = down_proj.shape[0], down_proj.shape[2]
    slots = tokens * top_k
    if tokens == 0:
        return torch.zeros_like(x) if residual is None else residual.clone()
    blocks = _tile_shapes(slots, blocks)
    counts = counts.to(torch.int32)
    hidden = _gate_up(x, order, counts, slots, top_k, gates, gate_up_proj, up_bias, act_code, gated, blocks["gate_up"])

    block_m, block_n, block_k, warps, stages = blocks["down"]
    down_proj = down_proj.contiguous()
    grid = (_most_tiles(slots, num_experts, block_m) * triton.cdiv(hidden_size, block_n),)
    fold_residual = top_k == 1 and residual is not None  # slot == token: add the shared output on the way
    out = torch.empty(slots, hidden_size, dtype=x.dtype, device=x.device)
    _down_kernel[grid](
        hidden, down_proj, residual.contiguous() if fold_residual else None, out, order, counts, num_experts,
        hidden_size, width, hidden.stride(0), down_proj.stride(0), down_proj.stride(1), out.stride(0),
        HAS_RESIDUAL=fold_residual, EVEN_K=width % block_k == 0, E_POW2=triton.next_power_of_2(num_experts),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    if top_k == 1:
        return out if fold_residual or residual is None else out + residual
    summed = out.view(tokens, top_k, hidden_size).sum(dim=1)
    return summed if residual is None else summed.add_(residual)


def dense_hidden(x: torch.Tensor, gate_up_proj, up_bias, act_code: int, gated: bool, blocks: dict | None = None):
    """A dense FFN's hidden rows [T, W] for x [T, H]: act(gate) * up, or act(up + bias), from gate_up_proj
    [2W or W, H] in one launch (the routed kernel with one expert that every token chose)."""
    tokens = x.shape[0]
    if tokens == 0:
        return x.new_empty(0, gate_up_proj.shape[0] // (2 if gated else 1))
    blocks = _tile_shapes(tokens, blocks)
    counts = torch.full((1,), tokens, dtype=torch.int32, device=x.device)
    return _gate_up(x, None, counts, tokens, 1, None, gate_up_proj[None], None if up_bias is None else up_bias[None],
                    act_code, gated, blocks["gate_up"])


def _gate_up(x, order, counts, slots, top_k, gates, gate_up_proj, up_bias, act_code, gated, blocks):
    """The hidden rows [slots, W] of every slot, in grouped order (order None: one expert, tokens in order)."""
    hidden_size = x.shape[1]
    num_experts, width = gate_up_proj.shape[0], gate_up_proj.shape[1] // (2 if gated else 1)
    block_m, block_n, block_k, warps, stages = blocks
    x, gate_up_proj = x.contiguous(), gate_up_proj.contiguous()
    hidden = torch.empty(slots, width, dtype=x.dtype, device=x.device)
    grid = (_most_tiles(slots, num_experts, block_m) * triton.cdiv(width, block_n),)
    _gate_up_kernel[grid](
        x, gate_up_proj, up_bias, None if gates is None else gates.contiguous(), hidden, order, counts, num_experts,
        hidden_size, width, x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), hidden.stride(0),
        TOP_K=top_k, GROUPED=order is not None, GATED=gated, HAS_BIAS=up_bias is not None,
        HAS_GATES=gates is not None, ACT=act_code, EVEN_K=hidden_size % block_k == 0,
        E_POW2=triton.next_power_of_2(num_experts), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return hidden


def _tile_shapes(slots: int, blocks: dict | None) -> dict:
    """`blocks` where given, else the tile shapes for this many slots."""
    return blocks or (FEW_SLOTS_BLOCKS if slots < FEW_SLOTS else BLOCKS)


def _most_tiles(slots: int, num_experts: int, block_m: int) -> int:
    """The most BLOCK_M tiles that `slots` rows split among `num_experts` groups can need."""
    return min(triton.cdiv(slots, block_m) + num_experts - 1, slots)
