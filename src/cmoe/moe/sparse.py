"""The `sparse` preset's FFN part: the whole FFN, run per token on its large inputs and large hidden activations.

Per token, gate and up read only the input channels whose |x_i| * s_i clears `input_threshold` (s_i: the norm
of channel i's weights in gate and up), and down reads only the neurons whose |h_j| * d_j clears
`hidden_threshold` (d_j: the norm of neuron j's down column). The thresholds are calibrated by the carve so that
the mean multiply-adds meet a budget. Weights are stored one row per input channel (`gate_up_proj` [H, 2I]) and
one row per neuron (`down_proj` [I, H]), so a decode step reads only the rows it uses.
"""

from __future__ import annotations

import torch
from torch import nn

from cmoe.moe import kernels
from cmoe.moe.kernels import ACTIVATION_CODES
from cmoe.moe.module import _hidden, _row_hidden, activation, buffer_floats


class SparseNeurons(nn.Module):
    """Drop-in for `SharedExperts` (its `forward` and `row_into`) with per-token activation sparsity."""

    def __init__(self, hidden_size: int, width: int, act: str, gated: bool, bias: bool):
        super().__init__()
        self.width, self.gated, self.act = width, gated, act
        self.gate_up_proj = nn.Parameter(torch.zeros(hidden_size, width * (2 if gated else 1)))  # [H, 2I]
        self.up_bias = nn.Parameter(torch.zeros(width)) if bias else None
        self.down_proj = nn.Parameter(torch.zeros(width, hidden_size))  # [I, H]
        self.input_scale = nn.Buffer(torch.ones(hidden_size))
        self.input_threshold = nn.Buffer(torch.zeros(()))  # 0: every channel (|x| * s >= 0)
        self.hidden_scale = nn.Buffer(torch.ones(width))
        self.hidden_threshold = nn.Buffer(torch.zeros(()))
        self.act_fn = activation(act)
        self.counting = False  # while True, forward adds the rows it reads to `read_rows` (cmoe.moe.compute)
        self.read_rows = nn.Buffer(torch.zeros(2, dtype=torch.long), persistent=False)  # inputs, neurons

    @torch.no_grad()
    def fill_from(self, ffn) -> "SparseNeurons":
        """Copy every neuron of `ffn` (`cmoe.hf.adapters.FFNWeights`) in; scales from its weights, thresholds at 0
        (every row read: the dense FFN)."""
        rows = ffn.up if ffn.gate is None else torch.cat([ffn.gate, ffn.up])
        self.gate_up_proj.copy_(rows.T)
        self.down_proj.copy_(ffn.down.T)
        if ffn.up_bias is not None:
            self.up_bias.copy_(ffn.up_bias)
        self.input_scale.copy_(rows.float().norm(dim=0))
        self.hidden_scale.copy_(ffn.down.float().norm(dim=0))
        self.input_threshold.zero_()
        self.hidden_threshold.zero_()
        return self

    def input_mask(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() * self.input_scale >= self.input_threshold

    def hidden_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.abs() * self.hidden_scale >= self.hidden_threshold

    def hidden(self, x: torch.Tensor, keep_in: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden activation [T, I] from the input channels x [T, H] keeps (`keep_in`, its input mask)."""
        keep_in = self.input_mask(x) if keep_in is None else keep_in
        return _hidden((x * keep_in) @ self.gate_up_proj, self.width, self.gated, self.act_fn, self.up_bias)

    def forward(self, x: torch.Tensor, triton=None) -> torch.Tensor:
        """x [T, H] -> [T, H]. Masks zero what is not read, so the products are dense (the prefill reads all)."""
        keep_in = self.input_mask(x)
        hidden = self.hidden(x, keep_in)
        keep_hidden = self.hidden_mask(hidden)
        if self.counting:
            self.read_rows += torch.stack([keep_in.sum(), keep_hidden.sum()])
        return (hidden * keep_hidden) @ self.down_proj

    def thresholds(self) -> tuple[float, float]:
        """The two thresholds as floats, read from the buffers once per change (a read costs a host sync)."""
        return buffer_floats(self, "input_threshold", "hidden_threshold")

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """A few tokens x [T, H] (no autograd), reading only the rows each keeps: the compiled CPU step where it
        applies, else PyTorch row by row."""
        compiled = kernels.moe_cpu() if x.device.type == "cpu" else None
        weights = self.down_proj.dtype
        if (compiled is not None and self.act in ACTIVATION_CODES and weights in (torch.float32, torch.bfloat16)
                and x.dtype in (torch.float32, torch.bfloat16)):
            input_threshold, hidden_threshold = self.thresholds()
            return compiled.sparse_decode(x, self.gate_up_proj, self.up_bias, self.down_proj, self.input_scale,
                                          input_threshold, self.hidden_scale, hidden_threshold,
                                          ACTIVATION_CODES[self.act], self.gated)
        out = torch.empty_like(x)
        for token in range(x.shape[0]):
            self.row_into(out[token], x[token])
        return out

    def row_into(self, out_row: torch.Tensor, row: torch.Tensor) -> None:
        """One token [H]: read only the rows its masks keep; write the output into `out_row`."""
        inputs = self.input_mask(row).nonzero().squeeze(1)
        projected = row[inputs].to(self.gate_up_proj.dtype) @ self.gate_up_proj.index_select(0, inputs)
        hidden = _row_hidden(projected, self.width, self.gated, self.act_fn, self.up_bias)
        neurons = self.hidden_mask(hidden).nonzero().squeeze(1)
        torch.mv(self.down_proj.index_select(0, neurons).T, hidden[neurons], out=out_row)
