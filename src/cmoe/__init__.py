"""cmoe: carve a dense causal LM into a Mixture-of-Experts model, without training (CMoE, arXiv 2502.04416).

    import cmoe
    cmoe.carve_(model, cmoe.CarveConfig(shared=3, active=3, experts=8), calibration=tokens)  # in place
    model.save_pretrained("out")        # AutoModelForCausalLM.from_pretrained("out") after `import cmoe`

Layout: `core/` the method (config, calibration loop, activations, grouping, router fitting, carve),
`moe/` the MoE FFN module with its backends and kernels, `hf/` the Hugging Face glue (adapters, carved
model classes, loading, checks, llama2.c), `tools/` what is built on them (CLI, evaluation, sweep, report,
fine-tuning, benchmark harness).
"""

from cmoe.core.presets import CarveConfig
from cmoe.errors import CMoEError
from cmoe.hf.modeling import register_all as _register_all
from cmoe.version import __version__

_register_all()

from cmoe.core.carve import carve_  # noqa: E402  (after the carved classes are registered)

__all__ = ["CarveConfig", "CMoEError", "carve_", "__version__"]
