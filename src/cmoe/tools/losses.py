"""The recovery fine-tune's losses: next-token cross-entropy, or distillation from the dense model (a fused,
chunked KL with its own backward, and a per-layer output error)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def training_loss(student, teacher, batch, config):
    """The step's loss on token ids `batch` [B, L]: next-token cross-entropy (config.loss "lm"), or the KL to the
    teacher's next-token distributions, plus config.hidden_weight times the layer-output error ("distill")."""
    layer_outputs = config.loss == "distill" and config.hidden_weight > 0
    # no logits for the last position, which has no next token: slicing them off afterwards would cost a
    # [tokens, vocabulary] product, and in the backward pass a zero-filled gradient of that size
    keep = torch.arange(batch.shape[1] - 1, device=batch.device)
    out = student(batch, use_cache=False, output_hidden_states=layer_outputs, logits_to_keep=keep)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    if config.loss == "lm":
        return F.cross_entropy(logits.float(), batch[:, 1:].reshape(-1))
    with torch.no_grad():
        reference = teacher(batch, use_cache=False, output_hidden_states=layer_outputs, logits_to_keep=keep)
    loss = distillation_kl(logits, reference.logits.reshape(logits.shape), config.temperature)
    if layer_outputs:
        loss = loss + config.hidden_weight * layer_output_error(out.hidden_states, reference.hidden_states)
    return loss


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    rows_per_chunk: int | None = None) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) between the softmaxes of logits [N, V] at `temperature`,
    scaled by temperature^2 as usual; differentiable in `student_logits`.

    Same value and gradient as `F.kl_div` on two log-softmaxes, in less time on a CPU and a fraction of the
    memory (BENCHMARKS.md): at a large vocabulary each [N, V] temporary is large, and autograd would keep
    several. This takes one
    exponential per logit, works through the rows in chunks that stay in cache (CPU: 8 rows), and keeps
    only the gradient.
    """
    if rows_per_chunk is None:
        # a GPU wants few, large kernels instead (1,024 rows: chosen, not yet timed there)
        rows_per_chunk = 8 if student_logits.device.type == "cpu" else 1024
    return _DistillationKL.apply(student_logits, teacher_logits, float(temperature), rows_per_chunk)


def _softmax_parts(logits: torch.Tensor, temperature: float):
    """(logits / t in float32, softmax, log-sum-exp [rows]) with one exponential per element."""
    scaled = logits.float() / temperature
    peak = scaled.amax(-1, keepdim=True)
    exp = (scaled - peak).exp_()
    norm = exp.sum(-1, keepdim=True)
    return scaled, exp.div_(norm), (peak + norm.log()).squeeze(-1)


class _DistillationKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, rows_per_chunk):
        rows = student_logits.shape[0]
        # kept in the logits' dtype: in bfloat16 half the memory, and the backward would round it there anyway
        gradient = torch.empty_like(student_logits)
        total = torch.zeros((), dtype=torch.float64, device=student_logits.device)
        with torch.autocast(student_logits.device.type, enabled=False):  # autocast would take the products to bf16
            for start in range(0, rows, rows_per_chunk):
                part = slice(start, start + rows_per_chunk)
                student, student_p, student_lse = _softmax_parts(student_logits[part], temperature)
                teacher, teacher_p, teacher_lse = _softmax_parts(teacher_logits[part], temperature)
                # KL per row = sum p_t (log p_t - log p_s) = sum p_t (t - s) + lse(s) - lse(t), as sum p_t = 1.
                # The terms cancel, so they are summed in float64: a float32 dot product's rounding depends on
                # the BLAS kernel (1e-4 apart between a Xeon and an EPYC on the same inputs).
                expected_gap = teacher.sub_(student).mul_(teacher_p).sum(dtype=torch.float64)
                total += expected_gap + (student_lse - teacher_lse).sum(dtype=torch.float64)
                # d KL / d student logit = (p_s - p_t) / t; with the t^2 scale and the mean: * t / rows
                gradient[part] = student_p.sub_(teacher_p).mul_(temperature / rows)
        ctx.save_for_backward(gradient)
        return (total * temperature * temperature / rows).float()

    @staticmethod
    def backward(ctx, grad_output):
        if getattr(ctx, "used", False):
            raise RuntimeError("distillation_kl's backward runs once: it scales its saved gradient in place.")
        ctx.used = True
        (gradient,) = ctx.saved_tensors
        # in place: the gradient is 400 MB at SmolLM2's vocabulary and 2,048 tokens
        return gradient.mul_(grad_output.to(gradient.dtype)), None, None, None


def layer_output_error(student_states, teacher_states) -> torch.Tensor:
    """Mean over decoder layers and tokens of ||student - teacher||^2 / ||teacher||^2 on each layer's output.

    Each layer gets its own signal, so a layer whose experts drifted is corrected where it drifted rather
    than only through the logits. The error is relative per token: a few tokens carry outputs hundreds of
    times larger than the rest (attention sinks), and would otherwise set the scale for the whole layer.
    """
    errors = []
    for student_output, teacher_output in zip(student_states[1:], teacher_states[1:]):  # [0]: embeddings
        teacher_output = teacher_output.float()
        difference = (student_output.float() - teacher_output).pow(2).sum(-1)
        errors.append((difference / teacher_output.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(errors).mean()
