"""cmoe: carve a dense causal LM into a sparsely activated one, without training (CMoE, arXiv 2502.04416).

    import cmoe
    cmoe.carve_(model, cmoe.CarveConfig(budget=0.5), calibration=tokens)  # in place; or CarveConfig.from_name("S3A3E8")
    model.save_pretrained("out")        # AutoModelForCausalLM.from_pretrained("out") after `import cmoe`

Layout: `core/` the method (config types and presets, the calibration loop, each method's builder, carve_),
`moe/` the carved FFNs (MoEFFN, SparseFFN) with their specs, cost model, backends and kernels, `hf/` the Hugging
Face glue (adapters, carved model classes, loading, checks, llama2.c), `serving/` vLLM and GGUF, `tools/` what is
built on them (CLI, evaluation, sweep, report, fine-tuning, benchmark harness).
"""

from cmoe.core.presets import CarveConfig
from cmoe.errors import CMoEError
from cmoe.core.carve import carve_
from cmoe.hf.modeling import register_all as _register_all
from cmoe.version import __version__

_register_all()  # so that AutoModelForCausalLM.from_pretrained finds carved folders after `import cmoe`

__all__ = ["CarveConfig", "CMoEError", "carve_", "__version__"]
