"""Compiled kernels, optional: built on first use with the machine's C++ compiler, plain PyTorch otherwise.

`triton_kernels()` gives the Triton kernels for the MoE FFN on a GPU (moe_triton.py: routed experts, shared
part, router), where Triton is installed; `cmoe.moe.GPU` says which of them run (by default the router and the
routed experts, the winners on an H200).

`moe_cpu()` gives `MoEFFN`'s CPU forward (moe_cpu.cpp: `moe_decode` for a few tokens, `moe_prefill` for
many) once it is built; the build takes about a minute, once per machine (torch keeps it under
~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR). Set CMOE_CPU_KERNEL=0 to use the PyTorch path instead.
If the build fails (no compiler, say), cmoe says so once and carries on with the PyTorch path, which gives
the same outputs up to rounding, only slower.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger("cmoe")

_SOURCE = Path(__file__).with_name("moe_cpu.cpp")
_NAME = "cmoe_moe_cpu"
_state: dict = {}

# activation names (transformers' ACT2FN keys) the kernels know, and its codes for them
ACTIVATION_CODES = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "relu": 3}


def enabled() -> bool:
    return os.environ.get("CMOE_CPU_KERNEL", "1") != "0"


def moe_cpu():
    """The compiled module with `moe_decode` and `moe_prefill`, or None where it is off or cannot be built."""
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
