"""Which backend runs an MoE FFN's tokens: decided here, in `backend_for`, and nowhere else.

    cpu_decode    the compiled CPU kernel for a few tokens: reads only the chosen experts' weights
    cpu_prefill   the compiled CPU kernel for many tokens: one BLAS product per expert, the rest in C++
    eager_decode  PyTorch operations token by token (a few tokens on a CPU where the kernels did not build)
    torch         the reference forward in PyTorch operations (grouped GEMMs where they apply, a loop over
                  experts under autograd), with the Triton kernels standing in for the pieces that `GPU`
                  switches on, on a GPU in half precision (`TritonPieces`)

The thresholds between them are measured crossovers (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cmoe.errors import CMoEError
from cmoe.moe import kernels
from cmoe.moe.kernels import ACTIVATION_CODES

CPU_DECODE, CPU_PREFILL, EAGER_DECODE, TORCH = "cpu_decode", "cpu_prefill", "eager_decode", "torch"

# The compiled decode step takes up to this many (token, expert) pairs, the prefill more; bfloat16 weights on
# a processor with AMX tiles take AMX_DECODE_KERNEL_SLOTS. Without the kernels, up to FEW_SLOTS pairs go
# token by token, more through the grouped products.
DECODE_KERNEL_SLOTS = {torch.float32: 24, torch.bfloat16: 48}
AMX_DECODE_KERNEL_SLOTS = 256
FEW_SLOTS = 4
KERNEL_DTYPES = tuple(DECODE_KERNEL_SLOTS)  # the dtypes the compiled kernels take
TRITON_DTYPES = (torch.bfloat16, torch.float16)
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")

logger = logging.getLogger("cmoe")


@dataclass
class GPUPaths:
    """Which forward a GPU takes where there is a choice. The defaults are what won when timed side by side on
    an H200 (bench/cuda_variants.py and bench/cuda_tiles.py; BENCHMARKS.md, issue 27): the Triton experts and
    router at every shape measured, cuBLAS for the shared part. CMOE_GPU_PATHS, where set, names the switches
    that are on (`none`: all off); `cmoe.moe.GPU.triton_experts = False` (say) does it in code. Without
    Triton, or in float32, the PyTorch operations run whatever the switches say."""

    counting_sort: bool = False  # group slots by `group_slots`' counting sort rather than a full sort
    # kernels/moe_triton.py (bfloat16 and float16):
    triton_experts: bool = True  # the routed experts in two launches (gather, products, activation, un-permute)
    triton_shared: bool = False  # the shared part's gate/up product and activation in one launch
    triton_router: bool = True  # the router and the grouping of slots by expert in two launches

    @classmethod
    def from_environment(cls) -> "GPUPaths":
        """The defaults where CMOE_GPU_PATHS is unset; else the switches it names (comma-separated) on and the
        others off."""
        if "CMOE_GPU_PATHS" not in os.environ:
            return cls()
        names = [name.strip() for name in os.environ["CMOE_GPU_PATHS"].split(",") if name.strip()]
        names = [name for name in names if name != "none"]
        known = [field.name for field in fields(cls)]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise CMoEError(f"CMOE_GPU_PATHS names {', '.join(unknown)}, which cmoe does not know; set it to a "
                            f"comma-separated list of {', '.join(known)}, or to none.")
        return cls(**{name: name in names for name in known})

    @contextmanager
    def switched(self, **switches):
        """Inside the block these switches are as given, after it as they were (for timing and checking)."""
        saved = {name: getattr(self, name) for name in switches}  # an unknown name raises AttributeError
        try:
            for name, value in switches.items():
                setattr(self, name, value)
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)


def _gpu_paths_at_import() -> GPUPaths:
    """CMOE_GPU_PATHS read once, when cmoe is imported; a bad value is reported, not raised, so that the
    import never fails: the defaults stand in."""
    try:
        return GPUPaths.from_environment()
    except CMoEError as error:
        logger.warning("cmoe: %s The defaults are used.", error)
        return GPUPaths()


GPU = _gpu_paths_at_import()


class TritonPieces(NamedTuple):
    """The Triton kernels' module for each piece of the torch backend that runs through them, else None."""

    router: object = None
    experts: object = None
    shared: object = None


NO_TRITON = TritonPieces()


def backend_for(moe, x: torch.Tensor) -> str:
    """The backend that runs `moe` (an MoEFFN) on x [T, H]."""
    router = fused_router(moe)
    if router is None or x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return TORCH
    slots = router.expected_slots(x.shape[0])
    weights = moe._modules["experts"]._parameters["down_proj"].dtype
    kernels_here = cpu_kernels(x.dtype, weights, router.act)
    if kernels_here is None:
        return EAGER_DECODE if slots <= FEW_SLOTS else TORCH
    if slots <= decode_kernel_slots(kernels_here, weights):
        return CPU_DECODE
    return CPU_PREFILL if x.dtype == weights else TORCH


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


def triton_applies(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can take x: CUDA, half precision, inference outside torch.compile."""
    return (x.is_cuda and x.dtype in TRITON_DTYPES and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def fused_router(moe):
    """The router where a fused path (a compiled CPU kernel, the Triton router) may run this FFN, else None.

    Not while the router counts its load (fine-tuning), and not for wrapped experts or shared part (peft
    LoRA during fine-tuning), which hold their weights behind the wrapper: only the torch backend runs them.
    """
    from cmoe.moe.module import RoutedExperts, SharedExperts

    modules = moe._modules
    router, shared = modules.get("router"), modules.get("shared")
    if (router is None or router.count_load or type(modules.get("experts")) is not RoutedExperts
            or not (shared is None or type(shared) is SharedExperts)):
        return None
    return router


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


def can_group(experts, x: torch.Tensor) -> bool:
    """Whether the routed experts' products can run as grouped GEMMs (else one product per expert).

    grouped_mm needs row strides that are multiples of 16 bytes, and bfloat16 on CUDA (torch 2.11) and
    wherever torch.compile traces it (its shape function takes nothing else, torch 2.13); not under autograd.
    """
    size = x.element_size()
    dtype_ok = x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())
    return (_HAS_GROUPED_MM and dtype_ok and not torch.is_grad_enabled()
            and all((n * size) % 16 == 0 for n in (experts.width, x.shape[-1])))


def cpu_kernel_call(function, x: torch.Tensor, *, shared_gate_up, shared_down, shared_bias, router_weight, router_bias,
                    selection_bias, gate_scale, gates_are_one: bool, gate_up, up_bias, down, down_bias, top_k: int,
                    act: str, gated: bool, linear_router: bool = False, threshold: float = float("-inf")) -> torch.Tensor:
    """One call of a compiled CPU kernel (`moe_decode` or `moe_prefill`), its arguments named."""
    return function(x, shared_gate_up, shared_down, shared_bias, router_weight, router_bias, selection_bias, gate_scale,
                    gates_are_one, gate_up, up_bias, down, down_bias, top_k, ACTIVATION_CODES[act], gated, linear_router,
                    threshold)
