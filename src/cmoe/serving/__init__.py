"""Carved models in serving engines: vLLM (exact, through its Transformers backend) and llama.cpp (GGUF)."""
