"""The MoE FFN that replaces a dense FFN (module.py; its sizes typed in spec.py), the backends that run it (backends.py: which forward runs
which tokens, one switch each) and their compiled kernels (kernels/)."""

from cmoe.moe.module import GPU, GPUPaths, MoEFFN, RoutedExperts, Router, SharedExperts
from cmoe.moe.spec import MoESpec

__all__ = ["GPU", "GPUPaths", "MoEFFN", "MoESpec", "RoutedExperts", "Router", "SharedExperts"]
