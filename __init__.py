"""qwen3vl: pretraining of the Qwen3-VL vision-language models with Megatron-style parallelism.

Subpackages: ``model`` (what the model is), ``parallel`` (layouts, process groups, the CPU backend),
``data`` (shards to packed batches), ``train`` (stages, loss, checkpoints), ``launch`` (torchrun,
Slurm, conversion commands).
"""
__version__ = "0.1.0"
