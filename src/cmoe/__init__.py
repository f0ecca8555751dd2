"""cmoe: carve a dense causal LM into a Mixture-of-Experts model, without training (CMoE, arXiv 2502.04416).

    import cmoe
    moe = cmoe.carve(model, cmoe.CarveConfig(shared=3, active=3, experts=8), calibration=tokens)
    moe.save_pretrained("out")          # AutoModelForCausalLM.from_pretrained("out") after `import cmoe`
"""

__version__ = "0.1.0"

from .config import CarveConfig  # noqa: E402
from .errors import CMoEError  # noqa: E402
from .modeling import register_all as _register_all  # noqa: E402

_register_all()

from .carve import carve  # noqa: E402

__all__ = ["CarveConfig", "CMoEError", "carve", "__version__"]
