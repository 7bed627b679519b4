"""Gemma2ForCausalLM: the spec (spec.py, what differs from Llama) and the graph (model.py)."""
