"""Interop: Hugging Face configs, weights and checkpoint directories, and our megatron checkpoint files.

Kept apart from ``qwen3vl.model`` (the architecture) so that the model package reads like the model.
"""
