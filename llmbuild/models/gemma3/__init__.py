"""Gemma3ForCausalLM (text): Gemma 2's graph (models/gemma2/model.py) with spec.py's differences."""
