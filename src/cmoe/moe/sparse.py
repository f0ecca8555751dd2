"""The `sparse` preset's FFN: the whole dense FFN, run per token on its large inputs and large hidden activations.

Per token, gate and up read only the input channels whose |x_i| * s_i clears `input_threshold` (s_i: the norm
of channel i's weights in gate and up), and down reads only the neurons whose |h_j| * d_j clears
`hidden_threshold` (d_j: the norm of neuron j's down column). The carve calibrates the thresholds
(`cmoe.core.sparse`) so that the mean multiply-adds meet a budget. Weights are stored one row per input channel
(`gate_up_proj` [H, 2I]) and one row per neuron (`down_proj` [I, H]), so a decode step reads only the rows it
uses.

A layer may also *complete* its kept neurons (`completes` 1): the hidden threshold then picks neurons by the
partial sums over the kept inputs, and each kept neuron's gate and up sums are finished over the inputs the
first pass skipped, from a neuron-major copy of gate and up (`gate_up_rows` [2I, H], present where the model's
spec says `complete`), so the neurons down reads carry their exact activations.
"""

from __future__ import annotations

import torch
from torch import nn

from cmoe.moe import backends, cost
from cmoe.moe.ffn import activation, buffer_floats, hidden_activation, row_hidden_activation
from cmoe.moe.spec import SparseSpec


class SparseFFN(nn.Module):
    """Drop-in replacement for a dense FFN with per-token activation sparsity, and (where the carve folds in what
    the skipped rows would add on average, or the FFN has one) an output bias."""

    kind = "sparse"

    def __init__(self, hidden_size: int, width: int, act: str, gated: bool, bias: bool, output_bias: bool = False,
                 complete: bool = False):
        super().__init__()
        self.hidden_size, self.width, self.gated, self.act = hidden_size, width, gated, act
        self.gate_up_proj = nn.Parameter(torch.zeros(hidden_size, width * (2 if gated else 1)))  # [H, 2I]
        self.up_bias = nn.Parameter(torch.zeros(width)) if bias else None
        self.down_proj = nn.Parameter(torch.zeros(width, hidden_size))  # [I, H]
        self.down_bias = nn.Parameter(torch.zeros(hidden_size)) if bias or output_bias else None
        self.input_scale = nn.Buffer(torch.ones(hidden_size))
        self.input_threshold = nn.Buffer(torch.zeros(()))  # 0: every channel (|x| * s >= 0)
        self.hidden_scale = nn.Buffer(torch.ones(width))
        self.hidden_threshold = nn.Buffer(torch.zeros(()))
        self.act_fn = activation(act)
        if complete:
            self.gate_up_rows = nn.Parameter(torch.zeros(width * (2 if gated else 1), hidden_size))  # [2I, H]
            self.completes = nn.Buffer(torch.zeros(()))  # 1: this layer completes its kept neurons' sums
        self.counting = False  # while True, forward adds the rows it reads to `read_rows` (cmoe.moe.compute)
        # inputs read, neurons read, and the input entries the kept neurons' completed sums read
        self.read_rows = nn.Buffer(torch.zeros(3, dtype=torch.long), persistent=False)

    @classmethod
    def from_spec(cls, spec: SparseSpec) -> "SparseFFN":
        """An empty module of this spec."""
        return cls(spec.hidden_size, spec.width, spec.act, spec.gated, spec.bias, spec.output_bias, spec.complete)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, ffn, output_bias: bool = False, complete: bool = False) -> "SparseFFN":
        """Every neuron of `ffn` (`cmoe.hf.adapters.FFNWeights`), on its weights' device and in their dtype; scales
        from its weights, thresholds at 0 (every row read: the dense FFN)."""
        sparse = cls(ffn.up.shape[1], ffn.width, ffn.act, ffn.gated, ffn.up_bias is not None, output_bias, complete)
        sparse = sparse.to(device=ffn.up.device, dtype=ffn.up.dtype)
        rows = ffn.up if ffn.gate is None else torch.cat([ffn.gate, ffn.up])
        sparse.gate_up_proj.copy_(rows.T)
        sparse.down_proj.copy_(ffn.down.T)
        if ffn.up_bias is not None:
            sparse.up_bias.copy_(ffn.up_bias)
        if ffn.down_bias is not None:
            sparse.down_bias.copy_(ffn.down_bias)
        if complete:
            sparse.gate_up_rows.copy_(rows)
        sparse.input_scale.copy_(rows.float().norm(dim=0))
        sparse.hidden_scale.copy_(ffn.down.float().norm(dim=0))
        return sparse

    def weight_dtype(self) -> torch.dtype:
        return self._parameters["down_proj"].dtype

    def drop_completion(self) -> None:
        """Remove the neuron-major copy (for a model none of whose layers completes)."""
        del self.gate_up_rows, self.completes

    @torch.no_grad()
    def sync_completion(self) -> None:
        """Make the neuron-major copy equal `gate_up_proj` again (after fine-tuning changed it)."""
        if "gate_up_rows" in self._parameters:
            self.gate_up_rows.copy_(self.gate_up_proj.T)

    # The compute count (cmoe.moe.compute): the masked forward adds the rows it reads to `read_rows`.

    def start_counting(self) -> None:
        self.read_rows.zero_()
        self.counting = True

    def stop_counting(self) -> None:
        self.counting = False

    def counted_share(self, dense_width: int, tokens: int) -> float:
        """The share of the dense FFN's multiply-adds (of `dense_width` neurons) it did for `tokens` tokens, from the
        rows it read since `start_counting`."""
        if not tokens:
            return float("nan")
        inputs, neurons, completed = self.read_rows.tolist()
        done = cost.sparse_macs(self.hidden_size, self.width, self.gated, inputs, neurons, completed)
        return done / (cost.dense_macs(self.hidden_size, dense_width, self.gated) * tokens)

    def completing(self) -> bool:
        return "completes" in self._buffers and buffer_floats(self, "completes")[0] > 0

    def thresholds(self) -> tuple[float, float]:
        """The two thresholds as floats, read from the buffers once per change (a read costs a host sync)."""
        return buffer_floats(self, "input_threshold", "hidden_threshold")

    def input_mask(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() * self.input_scale >= self.input_threshold

    def hidden_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.abs() * self.hidden_scale >= self.hidden_threshold

    def hidden(self, x: torch.Tensor, keep_in: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden activation [T, I] from the input channels x [T, H] keeps (`keep_in`, its input mask)."""
        keep_in = self.input_mask(x) if keep_in is None else keep_in
        return self.activation_of((x * keep_in) @ self.gate_up_proj)

    def activation_of(self, projected: torch.Tensor) -> torch.Tensor:
        """The hidden activation [T, I] from the gate and up sums [T, 2I]."""
        return hidden_activation(projected, self.width, self.gated, self.act_fn, self.up_bias)

    def add_output_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.down_bias is None else out + self.down_bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        return backends.backend_for(self, x).run(self, x).reshape(shape)

    def masked_forward(self, x: torch.Tensor, complete: bool | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H] with masks zeroing what is not read, so the products are dense (the prefill reads all);
        `complete`: whether the kept neurons' sums are completed (default: as the layer says)."""
        return self.add_output_bias(self.masked_products(x, self.completing() if complete is None else complete))

    def masked_products(self, x: torch.Tensor, complete: bool) -> torch.Tensor:
        """`masked_forward` without the output bias."""
        keep_in = self.input_mask(x)
        projected = (x * keep_in) @ self.gate_up_proj
        hidden = self.activation_of(projected)
        keep_hidden = self.hidden_mask(hidden)
        if complete:  # the kept neurons' sums over the skipped inputs too (computed for all: a dense product)
            hidden = self.activation_of(projected + (x * ~keep_in) @ self.gate_up_rows.T)
        if self.counting:
            skipped = (~keep_in).sum(-1) if complete else torch.zeros_like(keep_in[:, 0], dtype=torch.long)
            self.read_rows += torch.stack([keep_in.sum(), keep_hidden.sum(), (keep_hidden.sum(-1) * skipped).sum()])
        return (hidden * keep_hidden) @ self.down_proj

    def decode_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A few tokens x [T, H] (no autograd) in PyTorch operations, reading only the rows each keeps: the compiled
        step's fallback and reference."""
        out = torch.empty_like(x)
        for token in range(x.shape[0]):
            self.row_into(out[token], x[token])
        return self.add_output_bias(out)

    def row_into(self, out_row: torch.Tensor, row: torch.Tensor) -> None:
        """One token [H]: read only the rows its masks keep; write the output, without the bias, into `out_row`."""
        keep_in = self.input_mask(row)
        inputs = keep_in.nonzero().squeeze(1)
        projected = row[inputs].to(self.gate_up_proj.dtype) @ self.gate_up_proj.index_select(0, inputs)
        hidden = row_hidden_activation(projected.clone(), self.width, self.gated, self.act_fn, self.up_bias)
        neurons = self.hidden_mask(hidden).nonzero().squeeze(1)
        if self.completing():
            rest = (row * ~keep_in).to(self.gate_up_proj.dtype)
            rows = neurons if not self.gated else torch.cat([neurons, neurons + self.width])
            projected = projected[rows] + self.gate_up_rows.index_select(0, rows) @ rest
            bias = None if self.up_bias is None else self.up_bias[neurons]
            hidden = row_hidden_activation(projected, len(neurons), self.gated, self.act_fn, bias)
            torch.mv(self.down_proj.index_select(0, neurons).T, hidden, out=out_row)
            return
        torch.mv(self.down_proj.index_select(0, neurons).T, hidden[neurons], out=out_row)
