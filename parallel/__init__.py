"""Parallel layouts, process groups (megatron-core parallel_state), ZeRO-1 wrapping and the CPU backend."""
