"""The trainer core every method shares: config, the training loop, checkpoints, errors, profiling."""
