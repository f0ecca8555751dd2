"""The carved FFNs that replace a dense FFN, one module per kind, with their typed specs (spec.py):

    moe     `MoEFFN` (module.py): shared experts, routed experts (experts.py) and their router (router.py)
    sparse  `SparseFFN` (sparse.py): the whole FFN with per-token activation sparsity

Below them: the FFN arithmetic they share (ffn.py), the cost model (cost.py), the backends that run them
(backends.py: which forward runs which tokens) and their compiled kernels (kernels/); the compute count while a
model runs (compute.py)."""

from cmoe.moe.gpu import GPU, GPUPaths
from cmoe.moe.experts import RoutedExperts, SharedExperts
from cmoe.moe.module import MoEFFN
from cmoe.moe.router import Router
from cmoe.moe.sparse import SparseFFN
from cmoe.moe.spec import MoESpec, SparseSpec, spec_from_dict

FFN_KINDS = {"moe": MoEFFN, "sparse": SparseFFN}
CARVED_FFNS = tuple(FFN_KINDS.values())


def empty_ffn(spec: MoESpec | SparseSpec):
    """An empty carved FFN of this spec, of its kind's module."""
    return FFN_KINDS[spec.kind].from_spec(spec)


__all__ = ["CARVED_FFNS", "FFN_KINDS", "GPU", "GPUPaths", "MoEFFN", "MoESpec", "RoutedExperts", "Router",
           "SharedExperts", "SparseFFN", "SparseSpec", "empty_ffn", "spec_from_dict"]
