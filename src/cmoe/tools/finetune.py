"""`finetune(model, tokenizer, config, output)`: the short recovery fine-tune after carving.

LoRA (through peft) on the attention projections and on every expert, shared and routed; the router rows
and the gate scales `u` are trained in full. The selection bias is nudged by each step's expert load
(auxiliary-loss-free balancing, DeepSeek-V3 style). Two losses: next-token (`lm`), or distillation from the
dense model (`distill`, KL between teacher and student next-token distributions, teacher run on the fly).
Windows are cut from the token stream one batch at a time; checkpoints let a stopped run resume. At the
end LoRA is merged into the weights and the result is saved as an ordinary carved model.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cmoe.data import random_windows
from cmoe.errors import CMoEError
from cmoe.hf.modeling import is_carved
from cmoe.run_folder import drop_if_nothing_to_resume, partial_folder
from cmoe.tools.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, trainable_state
from cmoe.tools.lora import add_lora, expert_load_imbalance, gate_scales, rebalance, routers, step_selection_bias
from cmoe.tools.losses import training_loss



@dataclass
class FinetuneConfig:
    data: str = "wikitext2"  # wikitext2 (validation split), c4 (documents 500 on) or a text file
    samples: int = 2048  # training windows
    seqlen: int = 2048
    batch_size: int = 1
    loss: str = "lm"  # "lm" or "distill"
    temperature: float = 1.0  # distillation temperature
    hidden_weight: float = 0.0  # distillation: weight of the layer-output matching term (0: logits only)
    lora_rank: int = 8
    lora_alpha: int = 32
    lr: float = 1e-4  # LoRA
    router_lr: float = 1e-3  # router rows and gate scales
    schedule: str = "constant"  # learning rates: "constant", or "cosine" (down to 0 at the last step or time limit)
    bias_speed: float = 1e-3  # selection-bias step per optimiser step
    rebalance: bool = True  # at the end, set the selection bias afresh for the trained router (as carving does)
    epochs: int = 1
    max_minutes: float | None = None
    checkpoint_every: int = 50  # steps
    gradient_checkpointing: bool | None = None  # None: on only when the activations would not fit (see below)
    precision: str = "auto"  # matrix products in "bfloat16" (autocast; weights stay float32) or "float32"; see below
    seed: int = 0

    def __post_init__(self):
        if self.loss not in ("lm", "distill"):
            raise CMoEError(f"loss must be 'lm' or 'distill', got {self.loss!r}.")
        if self.precision not in ("auto", "bfloat16", "float32"):
            raise CMoEError(f"precision must be 'auto', 'bfloat16' or 'float32', got {self.precision!r}.")
        if self.schedule not in ("cosine", "constant"):
            raise CMoEError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}.")
        if self.hidden_weight < 0 or self.temperature <= 0:
            raise CMoEError("hidden_weight must be at least 0 and temperature above 0.")
        if self.hidden_weight > 0 and self.loss != "distill":
            raise CMoEError("The layer-output term (hidden_weight) matches a teacher, so it needs loss='distill'; "
                            "pass --loss distill or leave --hidden-weight out.")
        if min(self.samples, self.seqlen, self.batch_size, self.lora_rank, self.epochs) < 1:
            raise CMoEError("samples, seqlen, batch size, LoRA rank and epochs must all be at least 1.")
        if self.lora_alpha <= 0 or self.lr <= 0 or self.router_lr < 0 or self.bias_speed < 0:
            raise CMoEError(f"The LoRA alpha and learning rate must be above 0 and the router rate and bias speed at "
                            f"least 0 (got alpha {self.lora_alpha}, lr {self.lr}, router lr {self.router_lr}, bias speed "
                            f"{self.bias_speed}).")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise CMoEError(f"--max-minutes must be above 0, got {self.max_minutes}; leave it out to train to the end.")


class TrainingWindows:
    """`samples` seeded windows of `seqlen` tokens from one token stream, cut a batch at a time."""

    def __init__(self, ids: torch.Tensor, samples: int, seqlen: int, batch_size: int, seed: int):
        self.ids = ids.reshape(-1)
        if self.ids.numel() <= seqlen:
            raise CMoEError(f"The training text has {self.ids.numel()} tokens, too few for windows of {seqlen}; "
                            "give a longer text or a smaller --seqlen.")
        self.samples, self.seqlen, self.batch_size, self.seed = samples, seqlen, batch_size, seed

    def __len__(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def batch(self, step: int, epoch: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + step)
        count = min(self.batch_size, self.samples - step * self.batch_size)
        return random_windows(self.ids, count, self.seqlen, generator)


def finetune(model, tokenizer, config: FinetuneConfig, output: str | os.PathLike, *, teacher=None,
             calibration_ids: torch.Tensor | None = None, resume: bool = False, data_dir=None,
             progress: bool = True) -> dict:
    """Fine-tune the carved `model` and save it to `output`. Returns what was done (also in the saved record)
    and the loss of every step (only here)."""
    if not is_carved(model):
        raise CMoEError("Fine-tuning is for carved models; carve the model first (cmoe carve).")
    if config.loss == "distill" and teacher is None:
        raise CMoEError("Distillation needs the dense model; pass --teacher DENSE.")
    output = Path(output)
    work = partial_folder(output)
    drop_if_nothing_to_resume(work, (work / CHECKPOINT).is_file())
    if resume and not work.exists():
        raise CMoEError(f"There is no checkpoint to resume in {work}; run without --resume.")
    if not resume and work.exists():
        raise CMoEError(f"{work} holds a stopped fine-tune; pass --resume to continue it or delete it.")

    if calibration_ids is None:
        from cmoe.data import calibration_text, tokenize

        calibration_ids = tokenize(tokenizer, calibration_text(config.data, data_dir))
    windows = TrainingWindows(calibration_ids, config.samples, config.seqlen, config.batch_size, config.seed)
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    # windows outside the training order: `probe` to rebalance on at the end, `check` to measure the load
    probe = [windows.batch(i, epoch=10_000).to(device) for i in range(min(2, len(windows)))]
    check = [windows.batch(i, epoch=10_001).to(device) for i in range(min(2, len(windows)))]
    imbalance_before = expert_load_imbalance(model, check)

    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = activation_bytes(model, config) > 0.5 * free_memory(device)
    if checkpointing:
        _checkpointing(model, True)
    precision = training_precision(config.precision, device)
    student = add_lora(model, config)
    student.train()
    lora_parameters = [p for n, p in student.named_parameters() if p.requires_grad and "lora_" in n]
    router_parameters = [p for r in routers(student) for p in r.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([dict(params=lora_parameters, lr=config.lr),
                                   dict(params=router_parameters, lr=config.router_lr, weight_decay=0.0)])
    gate_scales_before = gate_scales(routers(student))
    state = dict(epoch=0, step=0, tokens=0, losses=[], seconds=0.0)
    if resume:
        saved = load_checkpoint(work)
        trainable_state(student, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    work.mkdir(parents=True, exist_ok=True)

    layer_routers = routers(student)
    for router in layer_routers:
        router.count_load = True
    started, stopped_early = time.perf_counter() - state["seconds"], False
    total = len(windows) * config.epochs
    bar = tqdm(total=total, initial=state["epoch"] * len(windows) + state["step"], desc="fine-tuning",
               disable=not progress)
    while state["epoch"] < config.epochs and not stopped_early:
        while state["step"] < len(windows):
            step_started = time.perf_counter()
            batch = windows.batch(state["step"], state["epoch"]).to(device)
            done = (state["epoch"] * len(windows) + state["step"]) / total
            _set_learning_rates(optimizer, config, share_done(done, state["seconds"], config.max_minutes))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                loss = training_loss(student, teacher, batch, config)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                step_selection_bias(layer_routers, config.bias_speed)
            state["step"] += 1
            state["tokens"] += batch.numel()
            state["losses"].append(round(loss.item(), 5))
            state["seconds"] = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if state["step"] % config.checkpoint_every == 0:
                save_checkpoint(work, student, optimizer, state)
            # stop when another step like this one would run past the limit, so the limit is never passed
            step_seconds = time.perf_counter() - step_started
            if config.max_minutes is not None and state["seconds"] + step_seconds > 60 * config.max_minutes:
                stopped_early = True
                break
        else:
            state["epoch"], state["step"] = state["epoch"] + 1, 0
    bar.close()
    for router in layer_routers:
        router.count_load = False

    gate_scales_after = gate_scales(layer_routers)
    merged = student.merge_and_unload()
    merged.eval()
    for module in merged.modules():  # a completing sparse layer's neuron-major copy follows the trained weights
        if hasattr(module, "sync_completion"):
            module.sync_completion()
    if checkpointing:
        _checkpointing(merged, False)
    imbalance_trained = imbalance_after = expert_load_imbalance(merged, check)
    if config.rebalance:
        rebalance(merged, probe)
        imbalance_after = expert_load_imbalance(merged, check)
    losses = state["losses"]
    summary = dict(config=asdict(config), gradient_checkpointing=checkpointing, precision=precision, steps=len(losses),
                   tokens=state["tokens"], seconds=round(state["seconds"], 1),
                   stopped_at_time_limit=stopped_early, first_loss=losses[0] if losses else None,
                   last_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                   imbalance_before=round(imbalance_before, 4), imbalance_trained=round(imbalance_trained, 4),
                   imbalance_after=round(imbalance_after, 4),
                   gate_scale_change=float(torch.cat([(gate_scales_after - gate_scales_before).abs(), torch.zeros(1)]).max()))
    merged.config.cmoe = dict(merged.config.cmoe, record=dict(merged.carve_record, finetune=summary))
    merged.save_pretrained(output, tokenizer=tokenizer)
    shutil.rmtree(work, ignore_errors=True)
    return dict(summary, losses=losses)


def training_precision(precision: str, device: torch.device) -> str:
    """The matrix-product precision for `precision` ("auto": bfloat16 where the hardware multiplies it natively,
    a GPU from Ampere on or a CPU with AMX or AVX-512 BF16, else float32).

    Under bfloat16 autocast the weights, the optimiser and the loss's sums stay float32. On a 2-core Xeon with
    AMX a 2,048-token SmolLM2 distillation step takes about 8 s instead of 14 s.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"  # from Ampere on
    native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return "bfloat16" if device.type == "cpu" and any(check() for check in native) else "float32"


def share_done(done: float, seconds: float, max_minutes: float | None) -> float:
    """How far the run is, 0 to 1: the share of steps taken or, under a time limit, of the time spent if
    that is further. A schedule that follows it ends where the run will end, whichever limit comes first."""
    if max_minutes is None:
        return done
    return min(1.0, max(done, seconds / (60 * max_minutes)))


def _set_learning_rates(optimizer, config: FinetuneConfig, share: float) -> None:
    factor = 0.5 * (1 + math.cos(math.pi * share)) if config.schedule == "cosine" else 1.0
    for group, base in zip(optimizer.param_groups, (config.lr, config.router_lr)):
        group["lr"] = base * factor


def activation_bytes(model, config: FinetuneConfig) -> int:
    """A rough size of what one training step keeps for the backward pass without checkpointing.

    Per token and layer: about 16 hidden-size and 6 FFN-width float32 tensors; plus the logits, their
    softmax and gradient. Checkpointing trades about a third more compute for most of this.
    """
    c = model.config
    hidden = c.hidden_size
    width = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * hidden
    layers = c.num_hidden_layers
    per_token = 4 * (layers * (16 * hidden + 6 * width) + 3 * c.vocab_size)
    return per_token * config.batch_size * config.seqlen


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _checkpointing(model, enable: bool) -> None:
    # transformers renamed gradient_checkpointing_* to activation_checkpointing_* (5.2x); accept both
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
