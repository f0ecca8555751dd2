"""Which forward runs a carved FFN's tokens: `backend_for(ffn, x)` asks the backends of the FFN's kind in turn, and
the first that applies runs. Decided here and nowhere else.

An MoE FFN (`MoEFFN`):
    engine        a serving engine's experts in place of ours (vLLM): our router and shared part around them
    cpu_decode    the compiled CPU kernel for a few tokens: reads only the chosen experts' weights
    cpu_prefill   the compiled CPU kernel for many tokens: one BLAS product per expert, the rest in C++
    eager_decode  PyTorch operations token by token (a few tokens on a CPU where the kernels did not build)
    torch         the reference forward in PyTorch operations (grouped GEMMs where they apply, a loop over
                  experts under autograd), with the Triton kernels standing in for the pieces that `GPU`
                  switches on, on a GPU in half precision (`TritonPieces`)
A sparse FFN (`SparseFFN`):
    sparse_cpu_decode  the compiled CPU step for a few tokens: reads only the rows each token keeps
    sparse_rows        the same rows in PyTorch operations, token by token (where the kernels did not build)
    masked             masks and dense products: prefill, GPUs (no host syncs), autograd, counting

The thresholds between them are measured crossovers. What does not change from call to call (the compiled
kernels, the dtypes they take, the decode step's capacity) is settled once per module and dtype (`static_facts`).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from cmoe.moe import kernels
from cmoe.moe.experts import RoutedExperts, SharedExperts, ours
from cmoe.moe.gpu import GPU
from cmoe.moe.kernels import ACTIVATION_CODES, MoEKernelArguments, SparseKernelArguments

# The compiled decode step takes up to this many (token, expert) pairs, the prefill more; bfloat16 weights on
# a processor with AMX tiles take AMX_DECODE_KERNEL_SLOTS. Without the kernels, up to FEW_SLOTS pairs go
# token by token, more through the grouped products. A sparse FFN's compiled step takes up to FEW_SLOTS tokens.
DECODE_KERNEL_SLOTS = {torch.float32: 24, torch.bfloat16: 48}
AMX_DECODE_KERNEL_SLOTS = 256
FEW_SLOTS = 4
KERNEL_DTYPES = tuple(DECODE_KERNEL_SLOTS)  # the dtypes the compiled kernels take
TRITON_DTYPES = (torch.bfloat16, torch.float16)


class StaticFacts(NamedTuple):
    """What decides a backend and does not change from call to call, for one module, input dtype and weights."""

    kernels: object  # the compiled CPU module where it takes these dtypes and the activation, else None
    decode_slots: int  # the most (token, expert) pairs its decode step takes
    weights: torch.dtype


_FACTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> {key: StaticFacts}; not on the module,
# which must stay copyable and picklable (the compiled kernels are a Python module)


def static_facts(ffn, x: torch.Tensor) -> StaticFacts:
    """`ffn`'s facts for inputs like x, settled once per (input dtype, weights' dtype, kernels switched on)."""
    weights = ffn.weight_dtype()
    key = (x.dtype, weights, kernels.enabled())
    cache = _FACTS.get(ffn)
    if cache is None:
        cache = _FACTS[ffn] = {}
    facts = cache.get(key)
    if facts is None:
        compiled = cpu_kernels(x.dtype, weights, ffn.act)
        slots = 0 if compiled is None else decode_kernel_slots(compiled, weights)
        facts = cache[key] = StaticFacts(compiled, slots, weights)
    return facts


def cpu_kernels(input_dtype: torch.dtype, weight_dtype: torch.dtype, act: str):
    """The compiled CPU kernels, where they apply: float32 or bfloat16 input and weights, an activation they
    know."""
    if input_dtype not in KERNEL_DTYPES or weight_dtype not in KERNEL_DTYPES or act not in ACTIVATION_CODES:
        return None
    return kernels.moe_cpu()


def decode_kernel_slots(kernels_here, weights: torch.dtype) -> int:
    """The most (token, expert) pairs the compiled decode step takes for weights of this dtype."""
    if weights is torch.bfloat16 and kernels_here.uses_amx():
        return AMX_DECODE_KERNEL_SLOTS
    return DECODE_KERNEL_SLOTS[weights]


def cpu_inference(x: torch.Tensor) -> bool:
    """Whether x is a CPU tensor run without autograd, outside torch.compile: where the host-side paths apply."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def fused_router(moe):
    """The router where a fused path (a compiled CPU kernel, the Triton router) may run this FFN, else None.

    Not while the router counts its load (fine-tuning), and not for wrapped experts or shared part (peft
    LoRA during fine-tuning), which hold their weights behind the wrapper: only the torch backend runs them.
    """
    modules = moe._modules
    router, shared = modules.get("router"), modules.get("shared")
    if (router is None or router.count_load or type(modules.get("experts")) is not RoutedExperts
            or not (shared is None or type(shared) is SharedExperts)):
        return None
    return router


class Backend:
    """A way to run an FFN's tokens x [T, H]: `applies` says when, `run` runs."""

    name = ""

    def applies(self, ffn, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def run(self, ffn, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Fallback(Backend):
    """The last backend of a kind: it takes whatever the ones before it do not."""

    def applies(self, ffn, x):
        return True


class TokenByToken(Backend):
    """The FFN's own PyTorch step, one token at a time (`decode_rows`): a compiled step's fallback and reference."""

    def run(self, ffn, x):
        return ffn.decode_rows(x)


# -- an MoE FFN -----------------------------------------------------------------------------------------------

class Engine(Backend):
    name = "engine"

    def applies(self, ffn, x):
        experts = ffn._modules.get("experts")
        return experts is not None and type(experts) is not RoutedExperts and not ours(experts)

    def run(self, ffn, x):
        return ffn.engine_forward(x)


def _fused_slots(ffn, x) -> int | None:
    """The (token, expert) pairs x is expected to take where a host-side path may run it, else None."""
    router = fused_router(ffn)
    if router is None or not cpu_inference(x):
        return None
    return router.expected_slots(x.shape[0])


class CompiledMoE(Backend):
    """The compiled CPU kernels, the whole MoE FFN in one call; each form says which calls it takes."""

    kernel = ""  # its function in the compiled module

    def takes(self, slots: int, facts: StaticFacts, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def applies(self, ffn, x):
        slots = _fused_slots(ffn, x)
        if slots is None:
            return False
        facts = static_facts(ffn, x)
        return facts.kernels is not None and self.takes(slots, facts, x)

    def run(self, ffn, x):
        return getattr(kernels.moe_cpu(), self.kernel)(x, *moe_kernel_arguments(ffn))  # `applies` found it built


class CPUDecode(CompiledMoE):
    name, kernel = "cpu_decode", "moe_decode"

    def takes(self, slots, facts, x):
        return slots <= facts.decode_slots


class CPUPrefill(CompiledMoE):
    name, kernel = "cpu_prefill", "moe_prefill"

    def takes(self, slots, facts, x):
        return slots > facts.decode_slots and x.dtype == facts.weights


class EagerDecode(TokenByToken):
    name = "eager_decode"

    def applies(self, ffn, x):
        slots = _fused_slots(ffn, x)
        return slots is not None and slots <= FEW_SLOTS and static_facts(ffn, x).kernels is None


class TorchForward(Fallback):
    name = "torch"

    def run(self, ffn, x):
        return ffn.torch_forward(x, triton_pieces(ffn, x))


def moe_kernel_arguments(moe) -> MoEKernelArguments:
    """`moe`'s arguments for the compiled kernels, read from nn.Module's dicts: an attribute lookup through
    nn.Module.__getattr__ costs about half a microsecond, and a decode step needs some twenty."""
    modules = moe._modules
    shared, router, experts = modules.get("shared"), modules["router"], modules["experts"]
    s = {} if shared is None else shared._parameters
    r, e = router._parameters, experts._parameters
    return MoEKernelArguments(
        s.get("gate_up_proj"), s.get("down_proj"), s.get("up_bias"), r["weight"], r.get("bias"),
        router._buffers["selection_bias"], r["gate_scale"], router.gates_are_one(), e["gate_up_proj"],
        e.get("up_bias"), e["down_proj"], moe._parameters.get("down_bias"), router.top_k,
        ACTIVATION_CODES[router.act], experts.gated, router.linear, router.threshold_value())


class TritonPieces(NamedTuple):
    """The Triton kernels' module for each piece of the torch backend that runs through them, else None."""

    router: object = None
    experts: object = None
    shared: object = None


NO_TRITON = TritonPieces()


def triton_applies(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can take x: CUDA, half precision, inference outside torch.compile."""
    return (x.is_cuda and x.dtype in TRITON_DTYPES and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def triton_pieces(moe, x: torch.Tensor) -> TritonPieces:
    """Which pieces of the torch backend the Triton kernels run for x: on a GPU, in half precision, without
    autograd or torch.compile, for activations they know, as `GPU` switches them."""
    if not triton_applies(x):
        return NO_TRITON
    module = kernels.triton_kernels()
    if module is None:
        return NO_TRITON
    router, experts, shared = fused_router(moe), moe.experts, moe.shared
    known = ACTIVATION_CODES
    return TritonPieces(
        router=(module if GPU.triton_router and router is not None and not router.linear and router.act in known
                else None),
        experts=module if GPU.triton_experts and experts is not None and getattr(experts, "act", None) in known else None,
        shared=module if GPU.triton_shared and shared is not None and getattr(shared, "act", None) in known else None,
    )


# -- a sparse FFN ---------------------------------------------------------------------------------------------

def _sparse_step_applies(ffn, x) -> bool:
    return x.shape[0] <= FEW_SLOTS and not ffn.counting and cpu_inference(x)


class SparseCPUDecode(Backend):
    name = "sparse_cpu_decode"

    def applies(self, ffn, x):
        return _sparse_step_applies(ffn, x) and static_facts(ffn, x).kernels is not None

    def run(self, ffn, x):
        return ffn.add_output_bias(kernels.moe_cpu().sparse_decode(x, *sparse_kernel_arguments(ffn)))


class SparseRows(TokenByToken):
    name = "sparse_rows"

    def applies(self, ffn, x):
        return _sparse_step_applies(ffn, x)


class Masked(Fallback):
    name = "masked"

    def run(self, ffn, x):
        return ffn.masked_forward(x)


def sparse_kernel_arguments(sparse) -> SparseKernelArguments:
    """`sparse`'s arguments for the compiled step (its output bias is added after)."""
    input_threshold, hidden_threshold = sparse.thresholds()
    return SparseKernelArguments(sparse.gate_up_proj, sparse.up_bias, sparse.down_proj, sparse.input_scale,
                                 input_threshold, sparse.hidden_scale, hidden_threshold, ACTIVATION_CODES[sparse.act],
                                 sparse.gated, sparse.gate_up_rows if sparse.completing() else None)


ENGINE, CPU_DECODE, CPU_PREFILL, EAGER_DECODE, TORCH = Engine(), CPUDecode(), CPUPrefill(), EagerDecode(), TorchForward()
SPARSE_CPU_DECODE, SPARSE_ROWS, MASKED = SparseCPUDecode(), SparseRows(), Masked()
BACKENDS = {"moe": (ENGINE, CPU_DECODE, CPU_PREFILL, EAGER_DECODE, TORCH),
            "sparse": (SPARSE_CPU_DECODE, SPARSE_ROWS, MASKED)}


def backend_for(ffn, x: torch.Tensor) -> Backend:
    """The backend that runs `ffn` (an MoEFFN or a SparseFFN) on x [T, H]."""
    for backend in BACKENDS[ffn.kind]:
        if backend.applies(ffn, x):
            return backend
    raise AssertionError("the last backend of each kind applies to everything")
