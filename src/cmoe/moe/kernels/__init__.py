"""Compiled kernels, optional: built on first use with the machine's C++ compiler, plain PyTorch otherwise.

`triton_kernels()` gives the Triton kernels for the MoE FFN on a GPU (moe_triton.py: routed experts, shared
part, router), where Triton is installed; `cmoe.moe.GPU` says which of them run (by default the router and the
routed experts, the winners on an H200).

`moe_cpu()` gives the CPU kernels (moe_cpu.cpp) once they are built: `MoEFFN`'s forward, `moe_decode` for a few
tokens (float32 or bfloat16 weights) and `moe_prefill` for many (float32 or bfloat16, input and weights alike), both
taking `MoEKernelArguments`; and `SparseFFN`'s decode step, `sparse_decode`, taking `SparseKernelArguments`. The
build takes about a minute, once per machine (torch keeps it under ~/.cache/torch_extensions, or
TORCH_EXTENSIONS_DIR). Set CMOE_CPU_KERNEL=0 to use the PyTorch path instead.
If the build fails (no compiler, say), cmoe says so once and carries on with the PyTorch path, which gives
the same outputs up to rounding, only slower.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch

logger = logging.getLogger("cmoe")

_SOURCE = Path(__file__).with_name("moe_cpu.cpp")
_NAME = "cmoe_moe_cpu"
_state: dict = {}

# activation names (transformers' ACT2FN keys) the kernels know, and its codes for them
ACTIVATION_CODES = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "relu": 3}


class MoEKernelArguments(NamedTuple):
    """The compiled MoE kernels' arguments after x (moe_cpu.cpp: `moe_decode`, `moe_prefill`), in their order.
    Optional tensors are None for FFNs without biases or without shared experts."""

    shared_gate_up: torch.Tensor | None  # [S * 2W, H], or [S * W, H] plain
    shared_down: torch.Tensor | None  # [H, S * W]
    shared_bias: torch.Tensor | None  # [S * W]
    router_weight: torch.Tensor  # [E (x 2 representative gated), H]
    router_bias: torch.Tensor | None  # [E]
    selection_bias: torch.Tensor  # [E], float32
    gate_scale: torch.Tensor  # [E]
    gates_are_one: bool  # every gate_scale 0: the gates' product is skipped
    gate_up: torch.Tensor  # [E, 2W, H], or [E, W, H]
    up_bias: torch.Tensor | None  # [E, W]
    down: torch.Tensor  # [E, H, W]
    down_bias: torch.Tensor | None  # [H]
    top_k: int
    act: int  # ACTIVATION_CODES
    gated: bool
    linear_router: bool
    threshold: float  # a dynamic linear router's, else -inf


class SparseKernelArguments(NamedTuple):
    """The compiled sparse step's arguments after x (moe_cpu.cpp: `sparse_decode`), in its order."""

    gate_up: torch.Tensor  # [H, 2I], or [H, I] plain: a row per input channel
    up_bias: torch.Tensor | None  # [I]
    down: torch.Tensor  # [I, H]: a row per neuron
    input_scale: torch.Tensor  # [H]
    input_threshold: float  # a token reads the gate/up rows of the channels with |x_i| * scale_i >= it
    hidden_scale: torch.Tensor  # [I]
    hidden_threshold: float  # and the down rows of the neurons with |h_j| * scale_j >= it
    act: int  # ACTIVATION_CODES
    gated: bool
    gate_up_rows: torch.Tensor | None  # [2I, H]: where the layer completes its kept neurons' sums


def enabled() -> bool:
    return os.environ.get("CMOE_CPU_KERNEL", "1") != "0"


def moe_cpu():
    """The compiled module (`moe_decode`, `moe_prefill`, `sparse_decode`), or None where it is off or cannot be
    built."""
    if not enabled():
        return None
    if "moe_cpu" not in _state:
        _state["moe_cpu"] = _build()
    return _state["moe_cpu"]


def triton_kernels():
    """The Triton kernels' module (`routed_experts`, `dense_hidden`, `route`), or None where Triton is not
    installed."""
    if "moe_triton" not in _state:
        try:
            from . import moe_triton as module
        except ImportError:
            module = None
        _state["moe_triton"] = module
    return _state["moe_triton"]


def _build():
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        if not _already_built(_NAME):
            logger.warning("cmoe: building the CPU kernels (once per machine, about a minute)")
        # -fopenmp: ATen's parallel_for is a header template that splits work with OpenMP pragmas, which a
        # build without it silently runs on one thread. The library it links is the libgomp torch loaded.
        return load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # any build failure falls back to the PyTorch path
        logger.warning("cmoe: could not build the CPU kernels, so the CPU forward uses plain PyTorch (slower): %s",
                       str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
        return None


def _already_built(name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, False)).glob("*.so"))
    except Exception:  # a private helper of torch: if it moves, we only lose the accuracy of one message
        return False


def _put_ninja_on_path() -> None:
    """torch builds with the `ninja` command; the pip package's copy is not on PATH unless the venv is active."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass  # the build then fails with torch's own message, and cmoe falls back to PyTorch
