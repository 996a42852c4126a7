"""Hydra recipes, one per pretraining stage (data, not code)."""
