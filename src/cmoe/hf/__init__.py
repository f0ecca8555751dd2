"""Hugging Face glue: where each architecture keeps its FFN (adapters), carved model classes registered with the
Auto classes (modeling), loading models of every kind (loading), checks of carved folders, llama2.c input."""
