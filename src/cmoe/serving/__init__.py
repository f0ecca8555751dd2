"""Carved models in serving engines: vLLM (exact, through its Transformers backend) and llama.cpp (GGUF)."""

SILU = ("silu", "swish")  # the activation names both engines' fused experts compute
