"""Model definitions: configs and presets, vision encoder, mergers, MRoPE, the Qwen3 LLM, HF adapters."""
