"""Entry points: torchrun / Slurm launch and Hugging Face conversion."""
