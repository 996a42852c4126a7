"""The four pretraining stages: configuration, loss, loop, checkpoints, metrics."""
