"""Which forward a GPU takes where there is a choice: `GPU`, switches read once from CMOE_GPU_PATHS."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields

from cmoe.errors import CMoEError

logger = logging.getLogger("cmoe")


@dataclass
class GPUPaths:
    """The defaults are what won when timed side by side on an H200 (bench/cuda_variants.py and
    bench/cuda_tiles.py; BENCHMARKS.md, GPU speed): the Triton experts and router at every shape measured, cuBLAS
    for the shared part. CMOE_GPU_PATHS, where set, names the switches that are on (`none`: all off);
    `cmoe.moe.GPU.triton_experts = False` (say) does it in code. Without Triton, or in float32, the PyTorch
    operations run whatever the switches say."""

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
