"""The MoE FFN that replaces a dense FFN (module.py), the backends that run it (backends.py: which forward runs
which tokens, one switch each) and their compiled kernels (kernels/)."""

from cmoe.moe.module import GPU, GPUPaths, MoEFFN, RoutedExperts, Router, SharedExperts

__all__ = ["GPU", "GPUPaths", "MoEFFN", "RoutedExperts", "Router", "SharedExperts"]
