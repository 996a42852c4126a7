"""Sharded webdataset streams to packed multimodal batches, exactly as Qwen3-VL sees them."""
