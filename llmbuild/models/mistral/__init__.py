"""MistralForCausalLM: Llama's decoder (spec.py states what differs)."""
