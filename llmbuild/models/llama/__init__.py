"""LlamaForCausalLM: the spec (spec.py, pure Python) and the graph (model.py, imported on use)."""
