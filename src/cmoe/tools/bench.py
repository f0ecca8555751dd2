"""Speed, measured honestly: dense and carved side by side in one process, interleaved, medians after warm-up.

Two levels: the FFN (dense module vs `MoEFFN` on the same input: the middle layer, and for decode also
every layer in turn, so that the weights come from memory rather than the cache), and the whole model
(prefill of one sequence, and greedy decoding with the KV cache at several batch sizes). Each result
carries the ideal ratio: from the FLOPs for prefill, and from the bytes of FFN weights read for decode.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from cmoe.moe import cost


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process rather than hand it back; True where it took effect.

    By default glibc maps each large block afresh and unmaps it when freed, so an FFN called again and
    again page-faults its temporaries on every call. Those of the dense FFN are larger (SmolLM2 at 2,048
    tokens: 12 MB each), so in a fresh process the faults slowed it more than the carved one and flattered
    carving (BENCHMARKS.md, "Page faults flattered the prefill ratios"). The benchmarks call this first, so
    that neither side pays them; cmoe itself leaves the allocator alone.
    """
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h; another libc answers 0 or has no mallopt
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**30))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(runs: dict[str, callable], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable, run in alternating order round after round (so drift hits all alike)."""
    names = list(runs)
    times = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            _sync(device)
            started = time.perf_counter()
            runs[name]()
            _sync(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def cuda_graph(fn):
    """`fn` (its inputs fixed) captured in a CUDA graph; calling the result replays it with no launch gaps.

    A GPU runs a small FFN's kernels faster than the host can launch them, so eager timings there measure
    the launches; replaying a graph measures the GPU's work, as a served model under CUDA graphs sees it.
    """
    if not torch.cuda.is_available():
        raise ValueError("CUDA graphs need a CUDA GPU; time the eager forward on this machine instead.")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the capture (also fills the gates-are-one cache)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# -- what the ideal speed-up is ----------------------------------------------------------------------------

@dataclass
class Shape:
    """What the ideal ratios need to know of a carved FFN: `experts` equal slices of a dense FFN `intermediate`
    neurons wide, `shared` always on, `active` of the `routed` ones per token (default: all that are not shared;
    fewer where the carve left some out); a sparse FFN's counted `compute_share`. The arithmetic is
    `cmoe.moe.cost`'s."""

    hidden: int
    intermediate: int
    shared: int
    active: int
    experts: int
    gated: bool = True
    compute_share: float | None = None  # a sparse FFN's: the share of the dense FFN's products (and rows) it uses
    router: str = "representative"
    routed: int | None = None

    def __post_init__(self):
        if self.routed is None:
            self.routed = self.experts - self.shared

    @property
    def width(self) -> int:
        return self.intermediate // self.experts

    def _share(self, experts_read: float) -> float:
        return cost.moe_share(self.intermediate, self.width, self.shared, self.routed, self.gated, self.router,
                              experts_read)

    def ideal_prefill_ratio(self, tokens: int) -> float:
        if self.compute_share is not None:
            return 1 / self.compute_share
        return 1 / self._share(self.active)

    def ideal_decode_ratio(self, batch: int) -> float:
        """Weight bytes the dense FFN reads over the carved one's, where each of `batch` tokens picks its experts
        at random."""
        if self.compute_share is not None:  # at batch 1; a batch reads the union of its tokens' rows
            return 1 / self.compute_share if batch == 1 else 1.0
        return 1 / self._share(cost.expected_experts_read(self.routed, self.active, batch))


def shape_of(ffn, dense_intermediate: int, compute_share: float | None = None) -> Shape:
    """The shape a carved FFN has for the ideal ratios; `compute_share`: a sparse FFN's (from its carve record)."""
    if ffn.kind == "sparse":
        return Shape(ffn.hidden_size, dense_intermediate, 1, 0, 1, gated=ffn.gated, compute_share=compute_share)
    width, shared, routed, router = ffn.layout()
    return Shape(ffn.hidden_size, dense_intermediate, shared, 0 if ffn.router is None else ffn.router.top_k,
                 dense_intermediate // width, gated=ffn.gated, router=router, routed=routed)


# -- the two levels ---------------------------------------------------------------------------------------------

@torch.no_grad()
def bench_ffn(dense: nn.Module, moe: nn.Module, shape: Shape, tokens: int, *, decode: bool, repeats: int = 20,
              warmup: int = 3, graphs: bool = False) -> dict:
    """Dense FFN vs carved FFN on `tokens` random inputs (a prefill of that many tokens, or a decode batch).

    `graphs` (CUDA): time replays of CUDA graphs of both, rather than eager calls.
    """
    parameter = next(dense.parameters())
    x = torch.randn(1, tokens, shape.hidden, dtype=parameter.dtype, device=parameter.device)
    runs = dict(dense=lambda: dense(x), carved=lambda: moe(x))
    if graphs:
        runs = {name: cuda_graph(run) for name, run in runs.items()}
    medians = interleaved_medians(runs, repeats, warmup, parameter.device)
    ideal = shape.ideal_decode_ratio(tokens) if decode else shape.ideal_prefill_ratio(tokens)
    return dict(level="ffn", mode="decode" if decode else "prefill", tokens=tokens, dense_ms=1e3 * medians["dense"],
                carved_ms=1e3 * medians["carved"], ratio=medians["dense"] / medians["carved"], ideal_ratio=ideal,
                ideal_basis="weight bytes read" if decode else "FLOPs", repeats=repeats, cuda_graph=graphs)


@torch.no_grad()
def bench_ffn_layers(dense_ffns: list[nn.Module], moes: list[nn.Module], shape: Shape, tokens: int, repeats: int = 20,
                     warmup: int = 3, graphs: bool = False, dense_weights: list | None = None) -> dict:
    """Decode through every layer's FFN in turn, as generation does: time per layer, dense vs carved.

    One layer run again and again keeps its weights in the CPU cache (SmolLM2's FFN is 10.6 MB, a server
    L3 is 32 MB or more); running all layers in turn makes each read its weights from memory, which is
    where the bytes not read pay off.

    With `dense_weights` (each layer's FFNWeights) on a CPU where the decode kernel runs, the dense FFNs are
    also timed through that kernel (`dense_kernel_ms`): the carved FFN's gain over it is the part that comes
    from carving alone, apart from the kernel reading weights faster than PyTorch's linear does at batch 1.
    """
    parameter = next(dense_ffns[0].parameters())
    inputs = [torch.randn(1, tokens, shape.hidden, dtype=parameter.dtype, device=parameter.device) for _ in dense_ffns]

    def through(ffns):
        for ffn, x in zip(ffns, inputs):
            ffn(x)

    runs = dict(dense=lambda: through(dense_ffns), carved=lambda: through(moes))
    dense_steps = _dense_kernel_steps(dense_weights, parameter, tokens) if dense_weights and not graphs else None
    if dense_steps is not None:
        runs["dense_kernel"] = lambda: [step(x.view(tokens, -1)) for step, x in zip(dense_steps, inputs)]
    if graphs:
        runs = {name: cuda_graph(run) for name, run in runs.items()}
    medians = interleaved_medians(runs, repeats, warmup, parameter.device)
    layers = len(dense_ffns)
    row = dict(level="ffn", layers=layers, mode="decode", tokens=tokens, dense_ms=1e3 * medians["dense"] / layers,
               carved_ms=1e3 * medians["carved"] / layers, ratio=medians["dense"] / medians["carved"],
               ideal_ratio=shape.ideal_decode_ratio(tokens), ideal_basis="weight bytes read", repeats=repeats,
               cuda_graph=graphs)
    if dense_steps is not None:
        row.update(dense_kernel_ms=1e3 * medians["dense_kernel"] / layers,
                   ratio_same_kernel=medians["dense_kernel"] / medians["carved"])
    return row


def _dense_kernel_steps(dense_weights: list, parameter: torch.Tensor, tokens: int):
    """Each dense FFN as a decode step of the CPU kernel: every neuron shared, no routed experts."""
    from cmoe.moe import kernels
    from cmoe.moe.backends import KERNEL_DTYPES, MoEKernelArguments, decode_kernel_slots

    kernel = kernels.moe_cpu() if parameter.device.type == "cpu" and parameter.dtype in KERNEL_DTYPES else None
    if kernel is None or tokens > decode_kernel_slots(kernel, parameter.dtype):
        return None
    if any(w.act not in kernels.ACTIVATION_CODES for w in dense_weights):
        return None
    hidden = dense_weights[0].down.shape[0]
    none = torch.zeros(0, dtype=parameter.dtype)  # the router and routed experts, all of size 0
    no_router, no_gate_up, no_down = none.view(0, hidden), none.view(0, 1, hidden), none.view(0, hidden, 1)
    steps = []
    for w in dense_weights:
        arguments = MoEKernelArguments(
            shared_gate_up=(w.up if w.gate is None else torch.cat([w.gate, w.up])).contiguous(),
            shared_down=w.down.contiguous(), shared_bias=w.up_bias, router_weight=no_router, router_bias=None,
            selection_bias=none, gate_scale=none, gates_are_one=True, gate_up=no_gate_up, up_bias=None, down=no_down,
            down_bias=w.down_bias, top_k=0, act=kernels.ACTIVATION_CODES[w.act], gated=w.gated, linear_router=False,
            threshold=float("-inf"))
        steps.append(lambda x, arguments=arguments: kernel.moe_decode(x, *arguments))
    return steps


@torch.no_grad()
def bench_prefill(dense_model, carved_model, seqlen: int, shape: Shape, repeats: int = 5, warmup: int = 1) -> dict:
    parameter = next(dense_model.parameters())
    ids = torch.randint(3, dense_model.config.vocab_size, (1, seqlen), device=parameter.device)
    runs = dict(dense=lambda: dense_model(ids, use_cache=False), carved=lambda: carved_model(ids, use_cache=False))
    medians = interleaved_medians(runs, repeats, warmup, parameter.device)
    return dict(level="model", mode="prefill", tokens=seqlen, dense_ms=1e3 * medians["dense"],
                carved_ms=1e3 * medians["carved"], ratio=medians["dense"] / medians["carved"],
                ffn_ideal_ratio=shape.ideal_prefill_ratio(seqlen), repeats=repeats)


@torch.no_grad()
def bench_decode(dense_model, carved_model, batch: int, shape: Shape, prompt: int = 32, new_tokens: int = 32,
                 repeats: int = 3, warmup: int = 1) -> dict:
    """Greedy generation of `new_tokens` after a `prompt`-token prompt, KV cache on: tokens/s of each."""
    parameter = next(dense_model.parameters())
    ids = torch.randint(3, dense_model.config.vocab_size, (batch, prompt), device=parameter.device)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=0)
    runs = dict(dense=lambda: dense_model.generate(ids, **settings), carved=lambda: carved_model.generate(ids, **settings))
    medians = interleaved_medians(runs, repeats, warmup, parameter.device)
    tokens = batch * new_tokens
    return dict(level="model", mode="decode", batch=batch, new_tokens=new_tokens, dense_tok_s=tokens / medians["dense"],
                carved_tok_s=tokens / medians["carved"], ratio=medians["dense"] / medians["carved"],
                ffn_ideal_ratio=shape.ideal_decode_ratio(batch), repeats=repeats)


def run_benchmark(carved_model, dense_model, modes=("prefill", "decode"), batches=(1, 8, 32), seqlen: int = 2048,
                  repeats: int | None = None, progress: bool = True) -> list[dict]:
    """Every measurement `cmoe bench` makes, as rows: FFN of the middle layer, then the whole model."""
    from tqdm.auto import tqdm

    from cmoe.hf.adapters import adapter_for

    adapter = adapter_for(dense_model)
    middle = len(adapter.layers(dense_model)) // 2
    dense_ffn = adapter.ffn_module(adapter.layers(dense_model)[middle])
    moe = adapter.ffn_module(adapter.layers(carved_model)[middle])
    shape = shape_of(moe, adapter.read(adapter.layers(dense_model)[middle], dense_model.config).width,
                     carved_model.carve_record.get("ffn_compute"))
    jobs = []
    if "prefill" in modes:
        jobs += [lambda: bench_ffn(dense_ffn, moe, shape, seqlen, decode=False, repeats=repeats or 10),
                 lambda: bench_prefill(dense_model, carved_model, seqlen, shape, repeats=repeats or 5)]
    if "decode" in modes:
        jobs += [lambda b=b: bench_ffn(dense_ffn, moe, shape, b, decode=True, repeats=repeats or 50) for b in batches]
        dense_ffns = [adapter.ffn_module(layer) for layer in adapter.layers(dense_model)]
        moes = [adapter.ffn_module(layer) for layer in adapter.layers(carved_model)]
        dense_weights = [adapter.read(layer, dense_model.config) for layer in adapter.layers(dense_model)]
        jobs += [lambda b=b: bench_ffn_layers(dense_ffns, moes, shape, b, repeats=repeats or 20,
                                              dense_weights=dense_weights) for b in batches]
        jobs += [lambda b=b: bench_decode(dense_model, carved_model, b, shape, repeats=repeats or 3) for b in batches]
    if next(dense_model.parameters()).is_cuda:  # the FFN again under CUDA graphs: the GPU's work, not the launches
        if "prefill" in modes:
            jobs += [lambda: bench_ffn(dense_ffn, moe, shape, seqlen, decode=False, repeats=repeats or 10, graphs=True)]
        if "decode" in modes:
            jobs += [lambda b=b: bench_ffn(dense_ffn, moe, shape, b, decode=True, repeats=repeats or 50, graphs=True)
                     for b in batches]
            jobs += [lambda b=b: bench_ffn_layers(dense_ffns, moes, shape, b, repeats=repeats or 20, graphs=True)
                     for b in batches]
    return [job() for job in tqdm(jobs, desc="benchmark", disable=not progress)]
